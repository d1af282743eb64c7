"""The checks ``RMTModel.forward`` and ``generate`` run on their inputs before the first segment.

Shapes and dtypes are read from the tensors' metadata (free); token id and label ranges and
masks with nothing to attend to need the values, read from the device in one sync. A bad input
raises ``ValueError`` naming the argument, instead of a raw torch error (or, for labels of the
wrong length, a loss computed against the wrong positions).
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100
MODEL_INPUTS = ("input_ids", "attention_mask", "labels")  # what RMTModel.forward takes from a batch


def _integer(tensor: torch.Tensor) -> bool:
    return not tensor.dtype.is_floating_point and not tensor.dtype.is_complex and tensor.dtype != torch.bool


def check_inputs(input_ids, attention_mask=None, labels=None, memory=None, *, vocab_size: int | None = None,
                 memory_shape: tuple[int, int] | None = None) -> None:
    """Raise ValueError naming the argument when the inputs cannot be processed.

    input_ids: (batch, length) integers in [0, vocab_size); attention_mask and labels: the same
    shape, the mask of 0/1 values with at least one 1 per sample, labels integers in
    [0, vocab_size) or -100 (ignored); memory: (batch, *memory_shape), finite. Labels that are all
    -100 are allowed: the loss is then 0 (nothing to learn from the batch, a zero gradient)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if 0 in input_ids.shape:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); RMTModel needs at least one "
                         f"sample of one token")
    if not _integer(input_ids):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    shape = tuple(input_ids.shape)
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have the shape of input_ids {shape}, got {tuple(tensor.shape)}")
    if labels is not None and not _integer(labels):
        raise ValueError(f"labels must hold integer token ids (or {IGNORE_INDEX}), got dtype {labels.dtype}")
    if memory is not None:
        if not isinstance(memory, torch.Tensor) or not memory.dtype.is_floating_point:
            raise ValueError(f"memory must be a floating-point torch.Tensor, got "
                             f"{getattr(memory, 'dtype', type(memory).__name__)}")
        expected = (shape[0], *memory_shape) if memory_shape is not None else None
        if expected is not None and tuple(memory.shape) != expected:
            raise ValueError(f"memory must be (batch, num_memory_tokens, hidden) = {expected}, got "
                             f"{tuple(memory.shape)}")

    # the values, in one sync
    checks = [input_ids.min(), input_ids.max()]
    if labels is not None:
        kept = torch.where(labels != IGNORE_INDEX, labels, 0)
        checks += [kept.min(), kept.max()]
    if memory is not None:
        checks.append((~torch.isfinite(memory)).any())
    if attention_mask is not None:
        mask = attention_mask
        checks += [((mask != 0) & (mask != 1)).any(), (~(mask != 0).any(dim=1)).any()]
    values = torch.stack([c.to(device=input_ids.device, dtype=torch.long) for c in checks]).tolist()
    low, high = values[0], values[1]
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, {vocab_size}) (the embedding's size), got values from "
                         f"{low} to {high}")
    if labels is not None:
        l_low, l_high = values[2:4]
        if l_low < 0 or (vocab_size is not None and l_high >= vocab_size):
            raise ValueError(f"labels must lie in [0, {vocab_size}) or be {IGNORE_INDEX} (ignored), got values "
                             f"from {l_low} to {l_high}")
    if memory is not None and values[4 if labels is not None else 2]:
        raise ValueError("memory holds NaN or infinite values; it would make every output NaN (was it read by a "
                         "model that diverged?)")
    if attention_mask is not None:
        not_binary, empty_row = values[-2:]
        if not_binary:
            raise ValueError("attention_mask must hold only 0 and 1")
        if empty_row:
            raise ValueError("attention_mask is all zero for a sample: it has nothing to attend to; drop the "
                             "sample or give it at least one token")
