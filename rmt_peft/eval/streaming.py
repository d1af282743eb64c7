"""Read a long input in constant memory, then score its end with logits.

The evaluators all do the same thing: everything before the segment that holds the positions to
score (the context) goes through ``rmt.stream`` (one segment at a time, no gradients, no logits),
and the rest (the tail) through an ordinary ``rmt(...)`` forward that continues from the streamed
memory. The segments are cut where ``rmt(...)`` on the whole input would cut them, so the logits
equal those of the whole-input forward while memory stays flat in the input length.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..recurrent import RMTModel, context_split

# (num_segments, num_samples) -> samples: dicts of 1-D LongTensors with input_ids and labels (a
# data registry dataset, a TokenMemoryTask, ...); what every evaluator reads its inputs from
SampleSource = Callable[[int, int], Sequence[dict]]


@torch.no_grad()
def stream_memory(rmt: RMTModel, input_ids: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor | None:
    """The memory after reading ``input_ids`` (batch, n) with the streaming reader; None when
    ``n == 0`` (the forward then starts from the learned initial memory). ``n`` must be a whole
    number of segments, except a short first one under right alignment."""
    cfg = rmt.memory_config
    batch, n = input_ids.shape
    if n == 0:
        return None
    reader = rmt.stream(batch_size=batch)
    short = n % cfg.segment_size
    if short:
        if cfg.segment_alignment != "right":
            raise ValueError(f"the context of {n} tokens is not a whole number of {cfg.segment_size}-token segments")
        # Right alignment: the first segment is the short one; read it, then stream whole segments.
        reader.memory = rmt.read(input_ids[:, :short]).to(reader.memory.dtype)
    chunk = chunk_size or 16 * cfg.segment_size
    for start in range(short, n, chunk):
        reader.feed(input_ids[:, start:start + chunk])
    return reader.finish().memory


@torch.no_grad()
def tail_logits(rmt: RMTModel, input_ids: torch.Tensor, first_scored: int,
                chunk_size: int | None = None) -> tuple[torch.Tensor, int]:
    """Logits of positions ``split ..`` of ``input_ids`` (batch, length) where ``split`` is the
    start of the segment holding ``first_scored``. Returns (logits, split)."""
    cfg = rmt.memory_config
    length = input_ids.shape[1]
    split = context_split(length, first_scored, cfg.segment_size, cfg.segment_alignment)
    memory = stream_memory(rmt, input_ids[:, :split], chunk_size)
    tail = input_ids[:, split:]
    output = rmt(tail, memory=memory, return_logits=True)
    return output.logits, split
