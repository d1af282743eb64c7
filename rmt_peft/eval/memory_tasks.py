"""Length generalisation of memory tasks: answer accuracy vs number of segments (Figs. 4-5).

A sample is read through the streaming path up to the segment that holds the question, then that
segment is run with logits and the answer is scored by greedy exact match under teacher forcing
(every answer token is the argmax given the true prefix: exactly when greedy generation would
write the answer). Memory is flat in the input length, so 4096 segments of 500 tokens
(2,048,000 tokens) need what 2 segments need; time grows linearly. Each length records accuracy,
wall time and peak memory.

Samples come from a ``SampleSource``: ``source(num_segments, num_samples)`` returns a sequence of
dicts with ``input_ids`` and ``labels`` (1-D), e.g. a ``build_dataset`` dataset or a
``TokenMemoryTask``. With ``answer_ids`` the answer is the last ``len(answer_ids)`` tokens,
whatever the labels (tasks that put the loss on every token still score only the answer).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..inputs import IGNORE_INDEX
from ..metrics import exact_match
from ..recurrent import RMTModel
from .profiling import measure
from .streaming import SampleSource, tail_logits


@dataclass
class LengthPoint:
    num_segments: int
    num_tokens: int
    num_samples: int
    accuracy: float
    seconds: float  # in the model (streaming + scoring), without building the samples
    wall_seconds: float
    seconds_per_sample: float
    tokens_per_second: float
    peak_memory_bytes: int
    memory_kind: str

    def to_dict(self) -> dict:
        return asdict(self)


def answer_labels(sample: dict) -> torch.Tensor:
    """Labels on the answer only: ``answer_ids`` (the last tokens) when given, else ``labels``."""
    answer = sample.get("answer_ids")
    if answer is None:
        return sample["labels"]
    answer = answer[answer != IGNORE_INDEX]
    labels = torch.full_like(sample["input_ids"], IGNORE_INDEX)
    labels[-len(answer):] = sample["input_ids"][-len(answer):]
    return labels


def _first_scored(labels: torch.Tensor) -> int:
    labelled = (labels[1:] != IGNORE_INDEX).nonzero()
    if not len(labelled):
        raise ValueError("a sample has no labelled answer token")
    return int(labelled[0])  # logits at t predict labels at t + 1


@torch.no_grad()
def score_batch(rmt: RMTModel, samples: list[dict], chunk_size: int | None = None) -> torch.Tensor:
    """Exact match (1.0 / 0.0) of each sample; the samples must share length and question segment."""
    device = rmt.memory_tokens.device
    labels = [answer_labels(s) for s in samples]
    first = min(_first_scored(row) for row in labels)
    # One sample is read as a view: a sample of millions of tokens is not copied.
    input_ids = samples[0]["input_ids"][None] if len(samples) == 1 else torch.stack([s["input_ids"] for s in samples])
    logits, split = tail_logits(rmt, input_ids.to(device), first, chunk_size)
    return exact_match(logits, torch.stack([row[split:] for row in labels]).to(device)).cpu()


def _batches(dataset: Sequence[dict], num_samples: int, batch_size: int, segment_size: int):
    """Consecutive samples of equal length whose answers start in the same segment, fetched one
    at a time (a sample of millions of tokens is never held with many others)."""
    def key(sample):
        return len(sample["input_ids"]), _first_scored(answer_labels(sample)) // segment_size

    batch: list[dict] = []
    for index in range(num_samples):
        sample = dataset[index]
        if batch and (len(batch) == batch_size or key(batch[0]) != key(sample)):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


def length_generalization(rmt: RMTModel, source: SampleSource, segments: Sequence[int], num_samples: int,
                          batch_size: int = 1, chunk_size: int | None = None, progress: bool = True,
                          bar: tqdm | None = None) -> list[LengthPoint]:
    """Accuracy, model time and peak memory for each number of segments in ``segments``
    (``bar``: a progress bar of segments read to advance instead of a new one)."""
    rmt.eval()
    device = rmt.memory_tokens.device
    points = []
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=sum(segments) * num_samples, desc="memory task", unit="segment", disable=not progress)
    for n in segments:
        bar.set_postfix(segments=n)
        dataset = source(n, num_samples)
        count = min(num_samples, len(dataset))
        correct, tokens, seconds = [], 0, 0.0
        with measure(device) as m:
            for batch in _batches(dataset, count, batch_size, rmt.memory_config.segment_size):
                start = time.perf_counter()
                correct.append(score_batch(rmt, batch, chunk_size))  # .cpu() inside waits for the device
                seconds += time.perf_counter() - start
                tokens += sum(len(s["input_ids"]) for s in batch)
                bar.update(len(batch) * n)  # segments read
        accuracy = float(torch.cat(correct).mean())
        points.append(LengthPoint(n, tokens // count, count, accuracy, seconds, m.seconds,
                                  seconds / count, tokens / seconds, m.peak_memory_bytes, m.memory_kind))
    if own_bar:
        bar.close()
    return points
