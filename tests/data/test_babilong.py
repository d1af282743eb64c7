import logging
import re
import time
import tracemalloc

import pytest
import torch

from rmt_peft.data.babilong import (OPPOSITE, MemoryTaskDataset, MemoryTaskOptions, ReasoningTaskOptions,
                                    answer_exact_match, read_babi_file)
from rmt_peft.data.lean import EXAMPLES

from .tokens import find, ids

QA1 = f"{EXAMPLES}/babi_qa1_example.txt"
QA4 = f"{EXAMPLES}/babi_qa4_example.txt"


def dataset(tokenizer, task="babilong_memorize", segment_size=32, num_segments=3, num_samples=20, seed=0, **options):
    cls = ReasoningTaskOptions if task == "babilong_reasoning" else MemoryTaskOptions
    return MemoryTaskDataset(task, cls(**options), tokenizer=tokenizer, segment_size=segment_size,
                             num_segments=num_segments, num_samples=num_samples, seed=seed)


def check_question_answer_labels(tokenizer, sample, story):
    """Question then answer close the sample; only the answer is labelled."""
    q, a = ids(tokenizer, story.question), ids(tokenizer, story.answer)
    x, labels = sample["input_ids"].tolist(), sample["labels"]
    assert x[len(x) - len(a) - len(q):] == q + a
    assert labels[-len(a):].tolist() == a
    assert (labels[:-len(a)] == -100).all()
    assert sample["answer_ids"].tolist() == a


@pytest.mark.parametrize("segment_size,num_segments", [(24, 1), (32, 3), (50, 7)])
def test_memorize_fact_opens_first_segment(tokenizer, segment_size, num_segments):
    data = dataset(tokenizer, segment_size=segment_size, num_segments=num_segments, num_samples=5)
    for i in range(5):
        sample, story = data[i], data.story(i)
        assert all(v.shape == (segment_size * num_segments,) and v.dtype == torch.long
                   for k, v in sample.items() if k != "answer_ids")
        fact = ids(tokenizer, story.facts[0])
        assert sample["input_ids"][:len(fact)].tolist() == fact
        check_question_answer_labels(tokenizer, sample, story)
        assert re.fullmatch(r"\w+ [a-z ]+ the \w+\.", story.facts[0])


def test_detect_fact_at_random_position(tokenizer):
    data = dataset(tokenizer, "babilong_detect", segment_size=32, num_segments=4, num_samples=30)
    starts = []
    for i in range(30):
        sample, story = data[i], data.story(i)
        fact = ids(tokenizer, story.facts[0])
        found = find(sample["input_ids"], fact)
        assert found == [data.layout(i).fact_spans[0][0]]
        starts.append(found[0])
        check_question_answer_labels(tokenizer, sample, story)
    assert len(set(starts)) > 15 and max(starts) >= 64  # spread over the segments, not only the first


def solve_relations(text: str, num_facts: int = 2) -> str:
    """An independent solver: read every 'The X is D of the Y.' in the text, answer the last question."""
    facts = re.findall(r"The (\w+) is (north|south|east|west) of the (\w+)\.", text)
    holds = set()
    for a, d, b in facts:
        holds |= {(a, d, b), (b, OPPOSITE[d], a)}
    direct = re.search(r"What is (north|south|east|west) of the (\w+)\?\s*$", text)
    if direct:
        answers = {a for a, d, b in holds if d == direct[1] and b == direct[2]}
    else:
        inverse = re.search(r"What is the (\w+) (north|south|east|west) of\?\s*$", text)
        answers = {b for a, d, b in holds if a == inverse[1] and d == inverse[2]}
    assert len(facts) == num_facts and len(answers) == 1, (facts, answers)
    return answers.pop()


def solve_object_location(text: str) -> str:
    holder, location = {}, {}
    for person, verb, thing in re.findall(r"(\w+) (picked up|grabbed|took|got|went to|travelled to|journeyed to"
                                          r"|moved to|went back to) the (\w+)\.", text):
        if verb in ("picked up", "grabbed", "took", "got"):
            holder[thing] = person
        else:
            location[person] = thing
    thing = re.search(r"Where is the (\w+)\?\s*$", text)[1]
    return location[holder[thing]]


@pytest.mark.parametrize("kind,solver", [("relations", solve_relations), ("object_location", solve_object_location)])
def test_reasoning_answer_correct_by_construction(tokenizer, kind, solver):
    data = dataset(tokenizer, "babilong_reasoning", segment_size=48, num_segments=3, num_samples=40,
                   reasoning_kind=kind)
    separated = 0
    for i in range(40):
        sample = data[i]
        answer = sample["answer_ids"]
        prompt = tokenizer.decode(sample["input_ids"][:-len(answer)])
        assert solver(prompt) == tokenizer.decode(answer).strip()
        (s0, e0), (s1, e1) = data.layout(i).fact_spans
        facts = data.story(i).facts
        assert [find(sample["input_ids"], ids(tokenizer, f)) for f in facts] == [[s0], [s1]]
        assert e0 <= s1  # two facts, in story order, not overlapping
        separated += s1 > e0
        check_question_answer_labels(tokenizer, sample, data.story(i))
    assert separated > 30  # independent random positions, usually with noise between them


def test_loss_on_all_and_exact_match(tokenizer):
    sample = dataset(tokenizer, loss_on="all", num_samples=1)[0]
    assert torch.equal(sample["labels"], sample["input_ids"])
    answer = sample["answer_ids"]
    assert answer_exact_match(torch.cat([answer, torch.tensor([5, 6])]), answer)
    assert not answer_exact_match(answer + 1, answer)
    assert answer_exact_match(answer, torch.cat([answer, torch.tensor([-100])]))  # collate padding


def test_deterministic_per_seed_and_index(tokenizer):
    a, b = dataset(tokenizer, "babilong_detect", num_samples=3), dataset(tokenizer, "babilong_detect", num_samples=3)
    c = dataset(tokenizer, "babilong_detect", num_samples=3, seed=1)
    assert torch.equal(a[2]["input_ids"], b[2]["input_ids"])
    assert not torch.equal(a[2]["input_ids"], a[1]["input_ids"])
    assert not torch.equal(a[2]["input_ids"], c[2]["input_ids"])


def test_too_short_for_the_story_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="num_segments \\* segment_size"):
        dataset(tokenizer, segment_size=4, num_segments=1)


def test_read_babi_file():
    samples = read_babi_file(QA1)
    assert len(samples) == 5
    assert samples[1].story[samples[1].supporting[0]] == "Daniel went back to the hallway."
    assert (samples[1].question, samples[1].answer) == ("Where is Daniel?", "hallway")
    assert samples[3].story == ("Sandra travelled to the office.", "Sandra went to the bathroom.")  # new story


@pytest.mark.parametrize("task", ["babilong_memorize", "babilong_detect", "babilong_reasoning"])
def test_babi_file_facts_land_where_the_task_says(tokenizer, task):
    data = dataset(tokenizer, task, segment_size=40, num_segments=2, num_samples=10, babi_file=QA4)
    for i in range(10):
        sample, story = data[i], data.story(i)
        assert len(story.facts) == 1
        fact = ids(tokenizer, story.facts[0])
        assert len(find(sample["input_ids"], fact)) == 1
        if task == "babilong_memorize":
            assert sample["input_ids"][:len(fact)].tolist() == fact
        check_question_answer_labels(tokenizer, sample, story)
        # qa4 answers follow from the supporting fact: check with the independent solver
        answer = sample["answer_ids"]
        assert solve_relations(tokenizer.decode(sample["input_ids"][:-len(answer)]), num_facts=1) == story.answer


def test_babi_questions_each_used_once_before_repeating(tokenizer):
    data = dataset(tokenizer, segment_size=64, num_segments=1, num_samples=10, babi_file=QA1)
    questions = [(s.question, s.answer, s.story) for s in read_babi_file(QA1)]
    first, second = ([(data.story(i).question, data.story(i).answer) for i in range(k, k + 5)] for k in (0, 5))
    assert sorted(first) == sorted(second) == sorted((q, a) for q, a, _ in questions)


def test_babi_story_mode_keeps_all_statements_in_order(tokenizer):
    data = dataset(tokenizer, "babilong_reasoning", segment_size=64, num_segments=2, num_samples=8,
                   babi_file=QA1, babi_facts="story")
    for i in range(8):
        sample, story = data[i], data.story(i)
        starts = [find(sample["input_ids"], ids(tokenizer, f))[0] for f in story.facts]
        assert starts == sorted(starts) and len(story.facts) >= 2


def test_babi_wrong_format_is_a_clear_error(tmp_path):
    bad = tmp_path / "qa.json"
    bad.write_text('{"story": ["Mary went home."], "question": "Where is Mary?"}\n')
    with pytest.raises(ValueError, match="no bAbI question found .*first bad line 1.*expected"):
        read_babi_file(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="file is empty"):
        read_babi_file(str(empty))


def test_babi_bad_lines_are_counted_skips(tmp_path, caplog):
    path = tmp_path / "qa.txt"
    path.write_bytes(b"1 Mary went to the office.\n2 Where is Mary?\toffice\t1\n"
                     b"oops not a line\n"
                     b"1 John went to the \xff\xfe kitchen.\n"
                     b"1 Bill moved to the garden.\n2 Where is Bill?\tgarden\t7\n"
                     b"3 Where is Bill?\tgarden\t1\n")
    with caplog.at_level(logging.WARNING, logger="rmt_peft.data"):
        samples = read_babi_file(str(path))
    assert [(s.question, s.answer) for s in samples] == [("Where is Mary?", "office"), ("Where is Bill?", "garden")]
    assert "kept 2 samples" in caplog.text
    assert "not valid UTF-8" in caplog.text and "does not start with 'ID '" in caplog.text
    assert "supporting IDs not in its story" in caplog.text


def test_two_million_token_sample_streams_in_bounded_memory(tokenizer):
    segment_size, num_segments = 1024, 2000  # 2,048,000 tokens
    data = dataset(tokenizer, "babilong_reasoning", segment_size=segment_size, num_segments=num_segments,
                   num_samples=2)
    list(data.iter_sample_chunks(1, chunk_size=65_536))  # warm the noise cache (bounded by its own limit)
    peaks = {}
    for length_segments in (250, num_segments):
        data.num_segments, data.length = length_segments, length_segments * segment_size
        start = time.time()
        tracemalloc.start()
        total, last, largest = 0, None, 0
        for chunk in data.iter_sample_chunks(0, chunk_size=65_536):
            total += len(chunk)
            largest = max(largest, len(chunk))
            last = chunk
        peaks[length_segments] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert total == length_segments * segment_size
        assert largest <= 65_536 and time.time() - start < 20
    story = data.story(0)
    tail = ids(tokenizer, story.question) + ids(tokenizer, story.answer)
    assert last[-len(tail):].tolist() == tail
    # a materialised 2,048,000-token string or id list would take tens of MB; we stay far below,
    # and 8x the length does not take more memory
    assert peaks[num_segments] < 2_000_000
    assert peaks[num_segments] < 1.5 * peaks[250] + 200_000


def test_streamed_chunks_equal_the_sample(tokenizer):
    data = dataset(tokenizer, "babilong_detect", segment_size=64, num_segments=5, num_samples=2)
    chunks = list(data.iter_sample_chunks(1, chunk_size=50))
    assert all(len(c) == 50 for c in chunks[:-1])
    assert torch.equal(torch.cat(chunks), data[1]["input_ids"])
    prompt = torch.cat(list(data.iter_sample_chunks(1, chunk_size=50, include_answer=False)))
    assert torch.equal(prompt, data[1]["input_ids"][:-len(data[1]["answer_ids"])])
