"""Associative retrieval: K key-value pairs spread over the segments, then one key is asked.

The capacity test of the ARMT paper (Rodkin et al. 2024, arXiv 2407.04841): how many pairs a
memory holds, not only how long. Raw token ids, no tokenizer. A pair is
``key SEP value END`` (``key_size`` + ``value_size`` + 2 tokens); keys and values draw their
tokens from separate id ranges, keys are distinct within a sample, values are independent (two
keys may share a value). A sample is exactly ``num_segments * segment_size`` tokens::

    [pair 1, FILL ...] [pair 2, FILL ...] ... [pair K, FILL ...] [FILL ... key ASK value]

* the pairs fill the segments from the start, ``pairs_per_segment`` to a segment (one, the
  paper's layout, by default), each segment's pairs first and ``FILL`` after them;
* segments after the last pair's are ``FILL`` only (a longer input holds the same pairs longer);
* the question (one of the K keys, then ``ASK``) and the answer (its value) close the last
  segment; the labels hold the answer only, so a model that does not keep the pairs is at chance
  (``1 / value_symbols ** value_size``) once the pairs and the question are in different segments.

``num_pairs`` (K) null means as many pairs as the segments before the last hold:
``(num_segments - 1) * pairs_per_segment`` (at least one), so a curriculum or an evaluation over
segments is one over K. With one segment (or a last pair in the question's segment) the pairs
share the segment with the question, which then needs room for both; any layout that does not fit
is an error naming the sizes. Token ids: ``FILL, SEP, END, ASK = 1..4``, keys from ``FIRST_KEY``
(5), values right after the keys' range; a model needs ``vocab_needed(options)`` ids.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..inputs import IGNORE_INDEX

FILL, SEP, END, ASK, FIRST_KEY = 1, 2, 3, 4, 5


@dataclass
class AssociativeRetrievalOptions:
    """associative_retrieval: ``num_pairs`` (K; null: fill every segment before the last),
    ``key_size`` / ``value_size`` tokens per key / value, ``key_symbols`` / ``value_symbols``
    distinct ids a key / value token takes (keys and values use separate ranges), and
    ``pairs_per_segment`` (several pairs to a segment when it has room)."""

    num_pairs: int | None = None
    key_size: int = 2
    value_size: int = 1
    key_symbols: int = 16
    value_symbols: int = 16
    pairs_per_segment: int = 1

    def __post_init__(self):
        for name in ("key_size", "value_size", "key_symbols", "value_symbols", "pairs_per_segment"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.num_pairs is not None and (not isinstance(self.num_pairs, int) or isinstance(self.num_pairs, bool)
                                           or self.num_pairs < 1):
            raise ValueError(f"num_pairs={self.num_pairs!r} must be null (fill the segments) or an integer >= 1")
        if self.num_pairs is not None and self.num_pairs > self.key_symbols ** self.key_size:
            raise ValueError(f"num_pairs={self.num_pairs} needs as many distinct keys, but key_symbols="
                             f"{self.key_symbols} and key_size={self.key_size} make only "
                             f"{self.key_symbols ** self.key_size}; allowed: num_pairs <= key_symbols ** key_size")

    @property
    def pair_tokens(self) -> int:
        return self.key_size + self.value_size + 2

    @property
    def question_tokens(self) -> int:
        """The question and its answer: key ASK value."""
        return self.key_size + 1 + self.value_size

    @property
    def first_value(self) -> int:
        return FIRST_KEY + self.key_symbols


def vocab_needed(options: AssociativeRetrievalOptions) -> int:
    """The number of token ids the samples use (ids are ``0 .. vocab_needed - 1``)."""
    return options.first_value + options.value_symbols


def pairs_in(options: AssociativeRetrievalOptions, num_segments: int) -> int:
    """K for ``num_segments`` segments: ``num_pairs``, or as many as the segments before the last hold."""
    if options.num_pairs is not None:
        return options.num_pairs
    return max(1, (num_segments - 1) * options.pairs_per_segment)


@dataclass(frozen=True)
class RetrievalSample:
    """One sample before tokens: the keys and values (tuples of ids) in order, and which key is asked."""

    keys: tuple[tuple[int, ...], ...]
    values: tuple[tuple[int, ...], ...]
    asked: int


class AssociativeRetrievalDataset(Dataset):
    """Deterministic samples: item ``i`` depends only on ``seed`` and ``i``."""

    def __init__(self, options: AssociativeRetrievalOptions, *, segment_size: int, num_segments: int,
                 num_samples: int, seed: int = 0):
        for name, value in (("segment_size", segment_size), ("num_segments", num_segments), ("num_samples", num_samples)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        o = options
        self.options, self.segment_size, self.num_segments = o, segment_size, num_segments
        self.num_samples, self.seed = num_samples, seed
        self.num_pairs = pairs_in(o, num_segments)
        if o.pairs_per_segment * o.pair_tokens > segment_size:
            raise ValueError(f"pairs_per_segment={o.pairs_per_segment} pairs of {o.pair_tokens} tokens (key_size + "
                             f"value_size + 2) do not fit segment_size={segment_size}; allowed: pairs_per_segment <= "
                             f"{segment_size // o.pair_tokens}")
        if self.num_pairs > o.key_symbols ** o.key_size:
            raise ValueError(f"{self.num_pairs} pairs (num_pairs null: (num_segments - 1) * pairs_per_segment) need as "
                             f"many distinct keys; key_symbols={o.key_symbols} and key_size={o.key_size} make only "
                             f"{o.key_symbols ** o.key_size}")
        self.length = segment_size * num_segments
        pair_segments = math.ceil(self.num_pairs / o.pairs_per_segment)
        last = self.pair_start(self.num_pairs - 1) + o.pair_tokens
        if last > self.length - o.question_tokens:
            raise ValueError(f"{self.num_pairs} pairs ({o.pairs_per_segment} a segment, {pair_segments} segments) and "
                             f"the question ({o.question_tokens} tokens) do not fit num_segments={num_segments} of "
                             f"segment_size={segment_size}; allowed: num_segments >= {pair_segments + 1} (the question in a "
                             f"segment of its own), or room for the question after the last pair")

    def pair_start(self, pair: int) -> int:
        """The position of pair ``pair``'s first token."""
        per = self.options.pairs_per_segment
        return (pair // per) * self.segment_size + (pair % per) * self.options.pair_tokens

    def sample(self, index: int) -> RetrievalSample:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        o = self.options
        rng = random.Random(f"associative_retrieval/{self.seed}/{index}")
        # distinct keys: K codes of key_symbols ** key_size without replacement, written in base key_symbols
        codes = rng.sample(range(o.key_symbols ** o.key_size), self.num_pairs)
        keys = tuple(tuple(FIRST_KEY + code // o.key_symbols ** d % o.key_symbols for d in range(o.key_size))
                     for code in codes)
        values = tuple(tuple(o.first_value + rng.randrange(o.value_symbols) for _ in range(o.value_size))
                       for _ in range(self.num_pairs))
        return RetrievalSample(keys, values, rng.randrange(self.num_pairs))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.sample(index)
        ids = [FILL] * self.length
        for pair, (key, value) in enumerate(zip(s.keys, s.values)):
            start = self.pair_start(pair)
            ids[start:start + self.options.pair_tokens] = [*key, SEP, *value, END]
        answer = list(s.values[s.asked])
        ids[self.length - self.options.question_tokens:] = [*s.keys[s.asked], ASK, *answer]
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[-len(answer):] = input_ids[-len(answer):]
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
                "answer_ids": torch.tensor(answer, dtype=torch.long)}
