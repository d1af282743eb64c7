"""One evaluation: models x a task's samples -> the task's curve, written to an output folder.

The task decides the curve: memory tasks (the data registry's ``MEMORY_TASKS``) give accuracy vs
number of segments; ``arxiv_lm`` gives perplexity vs history size and loss by position in the
target (a sample of ``n`` segments is ``n - 1`` history segments and the target); other LM tasks
(``lean``) give perplexity on all tokens and on the last segment vs number of segments. Every
model (the run and its no-memory baseline) sees the same samples: the dataset is built once per
length and shared.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from tqdm.auto import tqdm

from ..data.registry import MEMORY_TASKS
from ..recurrent import RMTModel
from . import reports
from .lm import history_curve, length_perplexity
from .memory_tasks import length_generalization
from .streaming import SampleSource

CURVES = ("accuracy", "history", "perplexity")
HISTORY_TASKS = ("arxiv_lm",)


def curve_for_task(task: str) -> str:
    if task in MEMORY_TASKS:
        return "accuracy"
    if task in HISTORY_TASKS:
        return "history"
    return "perplexity"


@dataclass
class EvalSettings:
    """curve: one of CURVES; segments: numbers of segments (input lengths) to evaluate;
    num_samples per length; batch_size for memory tasks (samples of equal length); chunk_size:
    tokens pushed into the stream at a time (default 16 segments)."""

    curve: str
    segments: list[int]
    num_samples: int = 100
    batch_size: int = 1
    chunk_size: int | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded as is in metrics.json
    plain_context: dict[str, int] = field(default_factory=dict)  # history curve: model -> context tokens

    def __post_init__(self) -> None:
        if self.curve not in CURVES:
            raise ValueError(f"EvalSettings.curve={self.curve!r} is invalid: expected one of {CURVES}")
        if not self.segments or not all(isinstance(n, int) and n >= 1 for n in self.segments):
            raise ValueError(f"EvalSettings.segments={self.segments!r} is invalid: expected integers >= 1")
        for name in ("num_samples", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EvalSettings.{name}={value!r} is invalid: expected an integer >= 1")


def evaluate(models: dict[str, RMTModel], build: SampleSource, settings: EvalSettings, out_dir: str) -> dict:
    """Run ``settings.curve`` for every model and write metrics.json, CSVs and plots to ``out_dir``.
    Lengths are the outer loop, so each length's dataset is built once and shared by the models."""
    os.makedirs(out_dir, exist_ok=True)
    s = settings
    results: dict = {name: [] for name in models}
    # The bar counts segments read, not samples: a sample of 1,024 segments takes 1,024 times as
    # long as one of a single segment, and the ETA must know it.
    if s.curve == "history":
        samples = build(max(s.segments), s.num_samples)
        histories = sorted(n - 1 for n in s.segments)
        total = len(models) * min(s.num_samples, len(samples)) * sum(h + 1 for h in histories)
    else:
        total = len(models) * s.num_samples * sum(s.segments)
    bar = tqdm(total=total, desc=f"eval {s.curve}", unit="segment", unit_scale=True, disable=not s.progress)
    if s.curve == "history":
        # Samples are cut in the first model's segments; plain-context models score the same targets.
        target_size = next(iter(models.values())).memory_config.segment_size
        for name, rmt in models.items():
            bar.set_postfix(model=name)
            results[name] = history_curve(rmt, samples, histories, s.num_samples, s.chunk_size, bar=bar,
                                          context_tokens=s.plain_context.get(name), target_size=target_size)
        files = reports.write_history(out_dir, results)
    else:
        for n in s.segments:
            dataset = build(n, s.num_samples)
            for name, rmt in models.items():
                bar.set_postfix(model=name, segments=n)
                if s.curve == "accuracy":
                    results[name] += length_generalization(rmt, lambda *_: dataset, [n], s.num_samples,
                                                           s.batch_size, s.chunk_size, bar=bar)
                else:
                    results[name] += length_perplexity(rmt, lambda *_: dataset, [n], s.num_samples,
                                                       s.chunk_size, bar=bar)
        write = reports.write_memory_task if s.curve == "accuracy" else reports.write_length_perplexity
        files = write(out_dir, results)
    bar.close()

    def as_data(result):
        return [p.to_dict() for p in result] if isinstance(result, list) else result.to_dict()

    metrics = {
        "curve": s.curve,
        "segments": list(s.segments),
        "num_samples": s.num_samples,
        "models": {name: {"segment_size": rmt.memory_config.segment_size,
                          "num_memory_tokens": rmt.memory_config.num_memory_tokens,
                          "device": str(rmt.memory_tokens.device)} for name, rmt in models.items()},
        **s.extra,
        "results": {name: as_data(result) for name, result in results.items()},
        "files": {key: os.path.relpath(path, out_dir) for key, path in files.items()},
    }
    reports.write_json(os.path.join(out_dir, "metrics.json"), metrics)
    return metrics
