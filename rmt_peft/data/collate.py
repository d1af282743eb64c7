"""Batching samples of different lengths: pad to the longest sample of the batch.

``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0, and every other key
(``labels``, ``answer_ids``) with -100, so padding never enters a loss or an exact-match check.
``padding_side="left"`` right-aligns the samples, which keeps the target segment of arxiv_lm
samples with mixed history sizes in the last segment of every row; ``answer_ids`` are always
padded on the right (they are compared from their first token).
"""
from __future__ import annotations

import torch

from ..inputs import IGNORE_INDEX

PADDING_SIDES = ("right", "left")


def collate(batch: list[dict[str, torch.Tensor]], pad_token_id: int = 0,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Stack a list of sample dicts (1-D tensors) into padded (batch, length) tensors."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side={padding_side!r} is not allowed; allowed: {PADDING_SIDES}")
    if not batch:
        raise ValueError("collate got an empty batch")
    keys = batch[0].keys()
    for number, sample in enumerate(batch):
        if sample.keys() != keys:
            raise ValueError(f"sample {number} has keys {sorted(sample)}, sample 0 has {sorted(keys)}")
    out = {}
    for key in keys:
        tensors = [sample[key] for sample in batch]
        if any(t.dim() != 1 for t in tensors):
            raise ValueError(f"collate expects 1-D tensors; {key!r} has shapes {[tuple(t.shape) for t in tensors]}")
        fill = pad_token_id if key == "input_ids" else 0 if key == "attention_mask" else IGNORE_INDEX
        side = "right" if key == "answer_ids" else padding_side
        width = max(len(t) for t in tensors)
        padded = tensors[0].new_full((len(tensors), width), fill)
        for row, t in enumerate(tensors):
            if side == "right":
                padded[row, :len(t)] = t
            else:
                padded[row, width - len(t):] = t
        out[key] = padded
    return out
