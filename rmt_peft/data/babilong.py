"""BABILong-style memory tasks: bAbI facts hidden in long background text (the paper's Figs. 3-5).

A sample is exactly ``num_segments * segment_size`` tokens::

    [noise ... fact ... noise ... (fact ... noise ...)] [question] [answer]

* ``babilong_memorize``: the fact(s) open the first segment;
* ``babilong_detect``: the fact(s), as one block, start at a random token position;
* ``babilong_reasoning``: two facts at independent random positions (order kept); the question
  needs them (two-argument relations as in bAbI task 4, or object + location as in task 2).

The question and answer close the last segment; labels cover the answer only (``loss_on="answer"``,
the default) or every token (``"all"``). ``answer_ids`` lets evaluation generate the answer after
``input_ids[:-len(answer_ids)]`` and score exact match (``answer_exact_match``).

Facts come from our own bAbI-style generator (people, places, objects, moves, relations) or from a
real bAbI task file (``babi_file``, the standard ``ID sentence`` / ``ID question<TAB>answer<TAB>ids``
format). Noise comes from noise.py. Samples are built lazily: ``iter_sample_chunks`` streams a
sample of any length (2,048,000 tokens and more) in LongTensor chunks without ever holding its text.
"""
from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..inputs import IGNORE_INDEX
from .noise import NoiseStream, TextSourceOptions, encode, take, text_source
from .skips import SkipCounter
logger = logging.getLogger("rmt_peft.data")

PEOPLE = ["Mary", "John", "Daniel", "Sandra", "Bill", "Fred", "Julie", "Emily", "Jeff", "Jason"]
PLACES = ["bathroom", "hallway", "garden", "office", "kitchen", "bedroom", "cinema", "park", "school",
          "library"]
OBJECTS = ["football", "apple", "milk", "box", "book", "key", "cake", "bottle"]
MOVES = ["went to", "travelled to", "journeyed to", "moved to", "went back to"]
TAKES = ["picked up", "grabbed", "took", "got"]
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
QUESTION_WORDS = ["The", "What", "Where", "is", "of", "the"]

LOSS_ON = ("answer", "all")
BABI_FACTS = ("supporting", "story")
REASONING_KINDS = ("relations", "object_location")
TASK_PLACEMENT = {"babilong_memorize": "start", "babilong_detect": "random_block",
                  "babilong_reasoning": "random_each"}


@dataclass(frozen=True)
class Story:
    """The facts to hide (in order), the question and its answer, all plain text."""

    facts: tuple[str, ...]
    question: str
    answer: str


def single_fact_story(rng: random.Random) -> Story:
    """bAbI task 1: "Mary went to the kitchen." -> "Where is Mary?" -> "kitchen"."""
    person, place = rng.choice(PEOPLE), rng.choice(PLACES)
    return Story((f"{person} {rng.choice(MOVES)} the {place}.",), f"Where is {person}?", place)


def relations_story(rng: random.Random) -> Story:
    """bAbI task 4 (two-argument relations): two places related to a third; the question asks for
    one of the two, either directly ("What is north of the Y?") or through the inverse relation
    ("What is the Y south of?"), so the model must keep both facts to answer either form."""
    first, middle, second = rng.sample(PLACES, 3)
    direction = rng.choice(list(OPPOSITE))
    other = rng.choice([d for d in OPPOSITE if d != direction])
    facts = (f"The {first} is {direction} of the {middle}.", f"The {second} is {other} of the {middle}.")
    subject, relation = rng.choice([(first, direction), (second, other)])
    if rng.random() < 0.5:
        question = f"What is {relation} of the {middle}?"
    else:
        question = f"What is the {middle} {OPPOSITE[relation]} of?"
    return Story(facts, question, subject)


def object_location_story(rng: random.Random) -> Story:
    """bAbI task 2 (two supporting facts): "Mary took the apple. Mary went to the garden." ->
    "Where is the apple?" -> "garden" (the first fact binds the object, the second moves it)."""
    person, thing, place = rng.choice(PEOPLE), rng.choice(OBJECTS), rng.choice(PLACES)
    facts = (f"{person} {rng.choice(TAKES)} the {thing}.", f"{person} {rng.choice(MOVES)} the {place}.")
    return Story(facts, f"Where is the {thing}?", place)


@dataclass(frozen=True)
class BabiSample:
    story: tuple[str, ...]      # every statement of the story before the question, in order
    question: str
    answer: str
    supporting: tuple[int, ...]  # indices into story


_BABI_LINE = re.compile(r"^(\d+) (.+)$")
BABI_FORMAT = "'ID sentence' lines and 'ID question<TAB>answer<TAB>supporting IDs' lines, IDs restarting at 1 per story"


def read_babi_file(path: str) -> list[BabiSample]:
    """Every question of a bAbI task file as a sample. Malformed lines and questions whose
    supporting IDs are not in their story are counted skips; a file with no sample is an error."""
    skips = SkipCounter(f"bAbI file {path}")
    samples: list[BabiSample] = []
    story: dict[int, str] = {}
    first_bad = None
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                skips.skip("line is not valid UTF-8", f"line {number}, byte {error.start}")
                first_bad = first_bad or (number, raw[:80])
                continue
            if not line.strip():
                continue
            match = _BABI_LINE.match(line)
            if not match:
                skips.skip("line does not start with 'ID '", f"line {number}")
                first_bad = first_bad or (number, line[:80])
                continue
            line_id, text = int(match[1]), match[2]
            if line_id == 1:
                story = {}
            if "\t" not in text:
                story[line_id] = text.strip()
                continue
            fields = text.split("\t")
            question, answer = fields[0].strip(), fields[1].strip()
            try:
                support_ids = [int(x) for x in fields[2].split()] if len(fields) > 2 else []
            except ValueError:
                support_ids = None
            if not question or not answer or support_ids is None or any(i not in story for i in support_ids):
                skips.skip("question line without answer or with supporting IDs not in its story", f"line {number}")
                first_bad = first_bad or (number, line[:80])
                continue
            order = sorted(story)
            samples.append(BabiSample(tuple(story[i] for i in order), question, answer,
                                      tuple(order.index(i) for i in sorted(support_ids))))
    if not samples:
        where = f" (first bad line {first_bad[0]}: {first_bad[1]!r})" if first_bad else " (the file is empty)"
        raise ValueError(f"{path}: no bAbI question found{where}; expected {BABI_FORMAT}")
    if skips.total:
        logger.warning("%s; kept %d samples", skips.summary(), len(samples))
    return samples


@dataclass
class MemoryTaskOptions:
    """Options of babilong_memorize and babilong_detect.

    ``noise``: a noise source (noise.py: "generated", "pg19", "quality" or a dict).
    ``loss_on``: "answer" (labels on the answer tokens only) or "all" (every token).
    ``babi_file``: take facts from this bAbI task file instead of the generator.
    ``babi_facts``: with a bAbI file, hide its "supporting" facts or the whole "story"."""

    noise: str | dict = "generated"
    loss_on: str = "answer"
    babi_file: str | None = None
    babi_facts: str = "supporting"

    def __post_init__(self):
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={self.loss_on!r} is not allowed; allowed: {LOSS_ON}")
        if self.babi_facts not in BABI_FACTS:
            raise ValueError(f"babi_facts={self.babi_facts!r} is not allowed; allowed: {BABI_FACTS}")
        self.noise_source = TextSourceOptions.parse(self.noise, "noise")


@dataclass
class ReasoningTaskOptions(MemoryTaskOptions):
    """babilong_reasoning: MemoryTaskOptions plus ``reasoning_kind``: "relations" (bAbI task 4, the
    paper's example) or "object_location" (bAbI task 2) for generated facts."""

    reasoning_kind: str = "relations"

    def __post_init__(self):
        super().__post_init__()
        if self.reasoning_kind not in REASONING_KINDS:
            raise ValueError(f"reasoning_kind={self.reasoning_kind!r} is not allowed; allowed: {REASONING_KINDS}")


@dataclass(frozen=True)
class SampleLayout:
    """Where everything lands in a sample: token spans ``(start, end)`` in ``input_ids``."""

    story: Story
    fact_spans: tuple[tuple[int, int], ...]
    question_span: tuple[int, int]
    answer_span: tuple[int, int]
    length: int


class MemoryTaskDataset(Dataset):
    """Deterministic samples (item ``i`` depends only on ``seed`` and ``i``) of one memory task."""

    def __init__(self, task: str, options: MemoryTaskOptions, *, tokenizer, segment_size: int,
                 num_segments: int, num_samples: int, seed: int = 0):
        if task not in TASK_PLACEMENT:
            raise ValueError(f"task={task!r} is not a memory task; allowed: {tuple(TASK_PLACEMENT)}")
        if tokenizer is None:
            raise ValueError(f"{task} needs a tokenizer (for offline use: rmt_peft.data.tokenizer.offline_tokenizer())")
        for name, value in (("segment_size", segment_size), ("num_segments", num_segments), ("num_samples", num_samples)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        self.task, self.options, self.tokenizer = task, options, tokenizer
        self.placement = TASK_PLACEMENT[task]
        self.segment_size, self.num_segments, self.num_samples, self.seed = segment_size, num_segments, num_samples, seed
        self.length = segment_size * num_segments
        self.noise = NoiseStream(text_source(options.noise_source), tokenizer)
        self._ids: dict[str, torch.Tensor] = {}
        self.babi: list[BabiSample] | None = None
        if options.babi_file:
            self.babi = self._fitting_babi_samples(read_babi_file(options.babi_file))
            # every question once (in a seeded order) before any repeats
            self.babi_order = list(range(len(self.babi)))
            random.Random(f"{task}/{seed}/babi_order").shuffle(self.babi_order)
        for index in range(min(num_samples, 32)):  # fail at construction, not mid-epoch
            self.layout(index)

    # ---- stories and token ids -------------------------------------------------------------
    def ids(self, text: str) -> torch.Tensor:
        """Token ids of one fact / question / answer, with the leading space of running text."""
        if text not in self._ids:
            if len(self._ids) > 100_000:  # bounded cache: generated stories have few distinct sentences
                self._ids.clear()
            self._ids[text] = torch.tensor(encode(self.tokenizer, " " + text), dtype=torch.long)
        return self._ids[text]

    def _babi_story(self, sample: BabiSample) -> Story:
        facts = sample.story if self.options.babi_facts == "story" else tuple(sample.story[i] for i in sample.supporting)
        return Story(facts, sample.question, sample.answer)

    def _fitting_babi_samples(self, samples: list[BabiSample]) -> list[BabiSample]:
        skips = SkipCounter(f"bAbI file {self.options.babi_file} at {self.length} tokens")
        kept = []
        for sample in samples:
            story = self._babi_story(sample)
            if not story.facts:
                skips.skip("no supporting fact IDs (use babi_facts='story')", sample.question)
            elif self._story_tokens(story) > self.length:
                skips.skip(f"story longer than num_segments * segment_size = {self.length} tokens", sample.question)
            else:
                kept.append(sample)
        if not kept:
            raise ValueError(f"no bAbI sample fits: {skips.summary()}")
        if skips.total:
            logger.warning("%s; kept %d of %d", skips.summary(), len(kept), len(samples))
        return kept

    def _story_tokens(self, story: Story) -> int:
        return sum(len(self.ids(f)) for f in story.facts) + len(self.ids(story.question)) + len(self.ids(story.answer))

    def story(self, index: int) -> Story:
        if self.babi is not None:
            return self._babi_story(self.babi[self.babi_order[index % len(self.babi)]])
        rng = random.Random(f"{self.task}/{self.seed}/{index}/story")
        if self.task != "babilong_reasoning":
            return single_fact_story(rng)
        kind = self.options.reasoning_kind
        return relations_story(rng) if kind == "relations" else object_location_story(rng)

    # ---- layout and streaming --------------------------------------------------------------
    def _gaps(self, index: int, num_facts: int, noise_total: int) -> list[int]:
        """Noise tokens before each fact and before the question (num_facts + 1 numbers)."""
        rng = random.Random(f"{self.task}/{self.seed}/{index}/positions")
        if self.placement == "start":
            cuts = [0] * num_facts
        elif self.placement == "random_block":
            cuts = [rng.randint(0, noise_total)] * num_facts
        else:
            cuts = sorted(rng.randint(0, noise_total) for _ in range(num_facts))
        bounds = [0, *cuts, noise_total]
        return [b - a for a, b in zip(bounds, bounds[1:])]

    def layout(self, index: int) -> SampleLayout:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        story = self.story(index)
        needed = self._story_tokens(story)
        if needed > self.length:
            raise ValueError(f"{self.task} sample {index}: facts + question + answer take {needed} tokens, more "
                             f"than num_segments * segment_size = {self.length}; raise segment_size or num_segments")
        gaps = self._gaps(index, len(story.facts), self.length - needed)
        position, spans = 0, []
        for gap, fact in zip(gaps, story.facts):
            position += gap
            spans.append((position, position + len(self.ids(fact))))
            position = spans[-1][1]
        position += gaps[-1]
        question_end = position + len(self.ids(story.question))
        return SampleLayout(story, tuple(spans), (position, question_end), (question_end, self.length), self.length)

    def _pieces(self, index: int, include_answer: bool) -> Iterator[torch.Tensor]:
        layout = self.layout(index)
        story = layout.story
        gaps = self._gaps(index, len(story.facts), self.length - self._story_tokens(story))
        noise = self.noise.chunks(random.Random(f"{self.task}/{self.seed}/{index}/noise"))
        carry: list[torch.Tensor] = []
        for gap, fact in zip(gaps, story.facts):
            yield from take(noise, gap, carry)
            yield self.ids(fact)
        yield from take(noise, gaps[-1], carry)
        yield self.ids(story.question)
        if include_answer:
            yield self.ids(story.answer)

    def iter_sample_chunks(self, index: int, chunk_size: int = 65_536,
                           include_answer: bool = True) -> Iterator[torch.Tensor]:
        """Sample ``index`` as LongTensor chunks of ``chunk_size`` tokens (the last may be shorter).
        Memory stays bounded by the chunk size and one noise document, whatever the sample length.
        ``include_answer=False`` stops after the question (the prompt for generation)."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        buffer, size = [], 0
        for piece in self._pieces(index, include_answer):
            while len(piece):
                room = chunk_size - size
                buffer.append(piece[:room])
                size += min(room, len(piece))
                piece = piece[room:]
                if size == chunk_size:
                    yield torch.cat(buffer)
                    buffer, size = [], 0
        if size:
            yield torch.cat(buffer)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = torch.cat(list(self.iter_sample_chunks(index, chunk_size=self.length)))
        answer_ids = self.ids(self.story(index).answer)
        if self.options.loss_on == "all":
            labels = input_ids.clone()
        else:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
            labels[-len(answer_ids):] = answer_ids
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
                "answer_ids": answer_ids.clone()}


def answer_exact_match(generated_ids: torch.Tensor, answer_ids: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> bool:
    """True when the first generated tokens equal the answer (``answer_ids`` may be padded with
    ``ignore_index`` by collate); extra generated tokens after the answer are not penalised."""
    answer = answer_ids[answer_ids != ignore_index]
    return len(generated_ids) >= len(answer) and bool(torch.equal(generated_ids[:len(answer)].cpu(), answer.cpu()))
