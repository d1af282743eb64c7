"""The smallest memory task, on raw token ids (no tokenizer): recall a value seen in segment 0.

A sample of ``num_segments * segment_size`` tokens: ``[FACT, value, noise...]`` opens the first
segment, noise fills the rest, and ``[..., QUESTION, value]`` closes the last. Only the answer
is labelled, so a model without memory is at chance (1 / num_values) beyond one segment.
Used by the quickstart and the core tests; the text tasks of the paper live in babilong.py.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..inputs import IGNORE_INDEX

FACT, QUESTION, FIRST_VALUE = 2, 3, 4

class TokenMemoryTask(Dataset):
    """Deterministic samples: item ``i`` is the same for the same ``seed``."""

    def __init__(self, num_samples: int, num_segments: int, segment_size: int, num_values: int = 10,
                 vocab_size: int = 128, seed: int = 0):
        first_noise = FIRST_VALUE + num_values
        if segment_size < 4 and num_segments == 1 or segment_size < 2:
            raise ValueError(f"segment_size={segment_size} is too small for fact + question (need >= 2, or 4 in one segment)")
        if vocab_size <= first_noise:
            raise ValueError(f"vocab_size={vocab_size} leaves no noise tokens; need > {first_noise}")
        self.num_samples, self.num_segments, self.segment_size = num_samples, num_segments, segment_size
        self.num_values, self.vocab_size, self.seed = num_values, vocab_size, seed
        self.first_noise = first_noise

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        length = self.num_segments * self.segment_size
        ids = torch.randint(self.first_noise, self.vocab_size, (length,), generator=g)
        value = FIRST_VALUE + int(torch.randint(self.num_values, (1,), generator=g))
        ids[0], ids[1] = FACT, value
        ids[-2], ids[-1] = QUESTION, value
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-1] = value
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
