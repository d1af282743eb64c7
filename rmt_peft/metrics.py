"""Metrics computed from logits and labels."""
from __future__ import annotations

import torch

from .inputs import IGNORE_INDEX


def exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample: 1.0 if the greedy prediction is right at every labelled position (the
    shifted causal-LM convention: logits at t predict labels at t+1), else 0.0."""
    predicted = logits[:, :-1].argmax(-1)
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    correct = (predicted == targets) | ~labelled
    return correct.all(dim=1).float()
