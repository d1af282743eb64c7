"""Associative retrieval samples, read back by hand: the token ids are written out here (FILL 1,
SEP 2, END 3, ASK 4, keys from 5, values after the keys' range), not taken from the module."""
import pytest
import torch

from rmt_peft.data.associative_retrieval import AssociativeRetrievalDataset, AssociativeRetrievalOptions
from rmt_peft.data.registry import build_dataset, validate_options

FILL, SEP, END, ASK = 1, 2, 3, 4


def build(segment_size=8, num_segments=5, num_samples=32, seed=0, **options):
    return AssociativeRetrievalDataset(AssociativeRetrievalOptions(**options), segment_size=segment_size,
                                       num_segments=num_segments, num_samples=num_samples, seed=seed)


def read(ids: list[int], segment_size: int, key_size: int, value_size: int, per_segment: int, num_pairs: int):
    """The pairs and the question of a sample, by walking its segments; asserts the filler between."""
    pair_len = key_size + value_size + 2
    pairs, position = [], 0
    while len(pairs) < num_pairs:
        segment = ids[position:position + segment_size]
        here = min(per_segment, num_pairs - len(pairs))
        for slot in range(here):
            piece = segment[slot * pair_len:(slot + 1) * pair_len]
            assert piece[key_size] == SEP and piece[-1] == END, piece
            pairs.append((tuple(piece[:key_size]), tuple(piece[key_size + 1:-1])))
        if position + segment_size < len(ids):  # not the question's segment: filler after the pairs
            assert segment[here * pair_len:] == [FILL] * (segment_size - here * pair_len), segment
        position += segment_size
    question = ids[-(key_size + 1 + value_size):]
    assert question[key_size] == ASK
    return pairs, tuple(question[:key_size]), tuple(question[key_size + 1:]), position


def test_one_pair_a_segment_then_the_question_and_labels_on_its_value_only():
    data = build(segment_size=8, num_segments=5)  # num_pairs null: 4 segments before the last, 4 pairs
    for index in range(len(data)):
        sample = data[index]
        ids = sample["input_ids"].tolist()
        assert len(ids) == 40 and sample["attention_mask"].tolist() == [1] * 40
        pairs, key, value, end = read(ids, 8, 2, 1, 1, 4)
        assert end == 32 and ids[32:36] == [FILL] * 4  # the question segment: filler, key, ASK, value
        keys = [k for k, _ in pairs]
        assert len(set(keys)) == 4 and keys.count(key) == 1  # distinct keys; the asked one once
        assert all(5 <= t < 21 for k in keys for t in k) and all(21 <= v[0] < 37 for _, v in pairs)
        assert value == dict(pairs)[key]
        labels = sample["labels"]
        assert labels[:-1].eq(-100).all() and labels[-1].item() == value[0]
        assert sample["answer_ids"].tolist() == list(value)


def test_several_pairs_a_segment_and_longer_keys_and_values():
    data = build(segment_size=16, num_segments=3, key_size=3, value_size=2, pairs_per_segment=2)
    for index in range(8):
        ids = data[index]["input_ids"].tolist()
        pairs, key, value, _ = read(ids, 16, 3, 2, 2, 4)  # 2 segments x 2 pairs of 7 tokens, then 2 FILL
        assert ids[14:16] == [FILL, FILL] and ids[30:32] == [FILL, FILL]
        assert value == dict(pairs)[key] and len(dict(pairs)) == 4
        assert data[index]["labels"][-2:].tolist() == list(value) and data[index]["labels"][:-2].eq(-100).all()


def test_fixed_pairs_leave_filler_segments_before_the_question():
    ids = build(segment_size=8, num_segments=6, num_pairs=2)[0]["input_ids"].tolist()
    read(ids, 8, 2, 1, 1, 2)
    assert ids[16:44] == [FILL] * 28  # segments 2, 3, 4 and the question segment's start


def test_one_segment_holds_a_pair_and_its_question_when_there_is_room():
    ids = build(segment_size=16, num_segments=1)[3]["input_ids"].tolist()
    assert ids[2] == SEP and ids[4] == END and ids[5:12] == [FILL] * 7 and ids[14] == ASK
    assert ids[12:14] == ids[0:2] and ids[15] == ids[3]
    with pytest.raises(ValueError, match="do not fit num_segments=1 of segment_size=8; allowed: num_segments >= 2"):
        build(segment_size=8, num_segments=1)


def test_samples_depend_only_on_seed_and_index():
    a, b, c = build(seed=3), build(seed=3, num_samples=64), build(seed=4)
    for i in range(32):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"])
    assert sum(not torch.equal(a[i]["input_ids"], c[i]["input_ids"]) for i in range(32)) >= 30
    asked = {read(a[i]["input_ids"].tolist(), 8, 2, 1, 1, 4)[0].index(
        (tuple(a[i]["input_ids"][-4:-2].tolist()), (a[i]["input_ids"][-1].item(),))) for i in range(32)}
    assert asked == {0, 1, 2, 3}  # every position gets asked


def test_every_key_of_a_small_key_space_once():
    """2 symbols x 2 tokens: 4 keys, all of them in each sample of 4 pairs (a permutation)."""
    data = build(segment_size=8, num_segments=5, key_symbols=2)
    for i in range(16):
        pairs, *_ = read(data[i]["input_ids"].tolist(), 8, 2, 1, 1, 4)
        assert sorted(k for k, _ in pairs) == [(5, 5), (5, 6), (6, 5), (6, 6)]


@pytest.mark.parametrize("options, message", [
    ({"key_size": 0}, "key_size=0 must be an integer >= 1"),
    ({"value_symbols": 1.5}, "value_symbols=1.5 must be an integer >= 1"),
    ({"num_pairs": 0}, "num_pairs=0 must be null \\(fill the segments\\) or an integer >= 1"),
    ({"num_pairs": 17, "key_size": 1}, "num_pairs=17 needs as many distinct keys, but key_symbols=16 and key_size=1 "
                                       "make only 16; allowed: num_pairs <= key_symbols \\*\\* key_size"),
    ({"pairs": 4}, "unknown option\\(s\\) \\['pairs'\\]; allowed: \\('num_pairs', 'key_size', 'value_size', "
                   "'key_symbols', 'value_symbols', 'pairs_per_segment'\\)"),
])
def test_options_are_validated_naming_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        validate_options("associative_retrieval", options)


def test_layouts_that_do_not_fit_name_the_sizes():
    with pytest.raises(ValueError, match="pairs_per_segment=2 pairs of 5 tokens .* do not fit segment_size=8; "
                                         "allowed: pairs_per_segment <= 1"):
        build(segment_size=8, pairs_per_segment=2)
    with pytest.raises(ValueError, match="8 pairs .* do not fit num_segments=5 .* allowed: num_segments >= 9"):
        build(segment_size=8, num_segments=5, num_pairs=8)
    with pytest.raises(ValueError, match="300 pairs .* need as many distinct keys; key_symbols=16 and key_size=2 "
                                         "make only 256"):
        build(segment_size=8, num_segments=301)


def test_a_recipe_names_the_task_and_builds_its_samples():
    from rmt_peft.recipe import RecipeError, load_recipe

    recipe = load_recipe("associative_retrieval")
    data = build_dataset(recipe.data.task, recipe.data.options, tokenizer=None, segment_size=recipe.memory.segment_size,
                         num_segments=5, num_samples=4, seed=0)
    pairs, key, value, _ = read(data[0]["input_ids"].tolist(), 16, 2, 1, 1, 4)
    assert value == dict(pairs)[key] and data[0]["answer_ids"].tolist() == list(value)
    with pytest.raises(RecipeError, match="vocab_size=32 is smaller than the 37 token ids that task "
                                          "'associative_retrieval' uses"):
        load_recipe("associative_retrieval", ["model.config.vocab_size=32"])
    with pytest.raises(RecipeError, match="data.options: key_size=0 must be an integer >= 1"):
        load_recipe("associative_retrieval", ["data.options.key_size=0"])
