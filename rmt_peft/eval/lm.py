"""Language-model curves: perplexity vs history size, loss by position (Figs. 7-8), and
perplexity on all tokens / on the last segment vs input length (Lean, Fig. 9).

History curve: every sample is ``H + 1`` segments of one document and its last segment is the
target (the ``arxiv_lm`` task with ``num_segments = H + 1``). For each history size ``h <= H`` the
model reads the ``h`` segments just before the target (streamed, constant memory) and is scored on
the target, so every history size scores the same target tokens. Scored tokens are positions
1 .. S-1 of the target (each predicted from the target's own preceding tokens plus the memory);
position 0 has no in-segment context and no prediction at h = 0, so it is left out everywhere.
A no-memory model (``num_memory_tokens = 0``) gives the flat baseline. A plain-context model
(``context_tokens``: GPT-2 with 0 / 128 / 768 history tokens in its window, Fig. 8) reads the
``context_tokens`` tokens before the target in the same window as the target, whatever the history
size: its line is flat too, at the level its context buys.

Length curve: each sample of ``n`` segments is streamed whole with its labels; the loss over all
labelled tokens and over the last segment's tokens (targets inside the last segment) give the two
perplexities, token-weighted over samples.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..inputs import IGNORE_INDEX
from ..recurrent import RMTModel, segment_bounds
from .profiling import measure
from .streaming import SampleSource, stream_memory


@dataclass
class HistoryCurve:
    """``perplexity[h]`` over the target; ``position_loss[h][i]``: mean loss of target token i+1."""

    history_sizes: list[int]
    context_tokens: int | None = None  # a plain-context model: history tokens in its window
    perplexity: dict[int, float] = field(default_factory=dict)
    loss: dict[int, float] = field(default_factory=dict)
    position_loss: dict[int, list[float]] = field(default_factory=dict)
    num_samples: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def target_token_losses(rmt: RMTModel, input_ids: torch.Tensor, history: int,
                        chunk_size: int | None = None) -> torch.Tensor:
    """Per-token losses (batch, S-1) of positions 1..S-1 of the last segment of ``input_ids``
    (batch, (H+1)*S), after reading its last ``history`` segments before the target."""
    size = rmt.memory_config.segment_size
    length = input_ids.shape[1]
    if length % size or length // size <= history:
        raise ValueError(f"a sample of {length} tokens is not {history} history segments + a target of {size}")
    target_start = length - size
    memory = stream_memory(rmt, input_ids[:, target_start - history * size:target_start], chunk_size)
    target = input_ids[:, target_start:]
    logits = rmt(target, memory=memory, return_logits=True).logits
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target[:, 1:], reduction="none")
    return losses.cpu()


@torch.no_grad()
def context_token_losses(rmt: RMTModel, input_ids: torch.Tensor, target_size: int, context_tokens: int) -> torch.Tensor:
    """Per-token losses (batch, S-1) of positions 1..S-1 of the last ``target_size`` tokens of
    ``input_ids``, read in one window after the ``context_tokens`` tokens before them."""
    window = context_tokens + target_size
    if window > input_ids.shape[1]:
        raise ValueError(f"a plain context of {context_tokens} tokens needs samples of at least {window} tokens, "
                         f"got {input_ids.shape[1]}: evaluate more segments of history")
    if window > rmt.memory_config.segment_size:
        raise ValueError(f"a plain context of {context_tokens} tokens + a target of {target_size} does not fit "
                         f"the model's segment of {rmt.memory_config.segment_size} tokens")
    ids = input_ids[:, -window:]
    logits = rmt(ids, return_logits=True).logits[:, context_tokens:]
    target = ids[:, context_tokens:]
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target[:, 1:], reduction="none").cpu()


def history_curve(rmt: RMTModel, samples: Sequence[dict], history_sizes: Sequence[int], num_samples: int,
                  chunk_size: int | None = None, progress: bool = True, bar: tqdm | None = None,
                  context_tokens: int | None = None, target_size: int | None = None) -> HistoryCurve:
    """Perplexity and per-position loss of the target segment for each history size
    (``bar``: a progress bar of segments read to advance instead of a new one). ``context_tokens``: score a
    plain-context model on targets of ``target_size`` tokens (the samples' segment size) instead."""
    rmt.eval()
    device = rmt.memory_tokens.device
    count = min(num_samples, len(samples))
    curve = HistoryCurve(list(history_sizes), context_tokens=context_tokens, num_samples=count)
    sums = {h: None for h in history_sizes}
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=count * sum(h + 1 for h in history_sizes), desc="history", unit="segment",
                   disable=not progress)
    for index in range(count):
        ids = samples[index]["input_ids"].unsqueeze(0).to(device)
        plain = None if context_tokens is None else context_token_losses(rmt, ids, target_size, context_tokens)
        for h in history_sizes:
            losses = (plain if plain is not None else target_token_losses(rmt, ids, h, chunk_size))[0].double()
            sums[h] = losses if sums[h] is None else sums[h] + losses
            bar.update(h + 1)  # segments read: the history and the target
    if own_bar:
        bar.close()
    for h in history_sizes:
        per_position = sums[h] / count
        curve.position_loss[h] = per_position.tolist()
        curve.loss[h] = float(per_position.mean())
        curve.perplexity[h] = math.exp(curve.loss[h])
    return curve


@dataclass
class LengthPerplexity:
    num_segments: int
    num_tokens: int
    num_samples: int
    perplexity_all: float
    perplexity_last_segment: float
    loss_all: float
    loss_last_segment: float
    seconds: float
    peak_memory_bytes: int
    memory_kind: str

    def to_dict(self) -> dict:
        return asdict(self)


def _last_segment_targets(labels: torch.Tensor, segment_size: int, alignment: str) -> int:
    """Labelled targets predicted inside the last segment (its positions predict labels[t + 1])."""
    start = segment_bounds(len(labels), segment_size, alignment)[-1][0]
    return int((labels[start + 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def length_perplexity(rmt: RMTModel, source: SampleSource, segments: Sequence[int], num_samples: int,
                      chunk_size: int | None = None, progress: bool = True,
                      bar: tqdm | None = None) -> list[LengthPerplexity]:
    """Perplexity on all labelled tokens and on the last segment for each number of segments
    (``bar``: a progress bar of segments read to advance instead of a new one)."""
    rmt.eval()
    cfg = rmt.memory_config
    device = rmt.memory_tokens.device
    chunk = chunk_size or 16 * cfg.segment_size
    points = []
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=sum(segments) * num_samples, desc="perplexity", unit="segment", disable=not progress)
    for n in segments:
        bar.set_postfix(segments=n)
        dataset = source(n, num_samples)
        count = min(num_samples, len(dataset))
        all_sum = all_count = last_sum = last_count = tokens = 0
        seconds = 0.0
        with measure(device) as m:
            for index in range(count):
                sample = dataset[index]
                ids, labels = sample["input_ids"], sample["labels"]
                if cfg.segment_alignment == "right" and len(ids) % cfg.segment_size:
                    # The stream cuts from the left; a right-aligned model would cut this sample elsewhere.
                    raise ValueError(f"a sample of {len(ids)} tokens is not a whole number of {cfg.segment_size}-token "
                                     "segments and the model uses segment_alignment='right'; evaluate with "
                                     "memory.segment_alignment=left")
                start = time.perf_counter()
                reader = rmt.stream(compute_loss=True)
                for s in range(0, len(ids), chunk):
                    reader.feed(ids[s:s + chunk].to(device), labels[s:s + chunk].to(device))
                result = reader.finish()
                seconds += time.perf_counter() - start
                total = int((labels[1:] != IGNORE_INDEX).sum())
                last = _last_segment_targets(labels, cfg.segment_size, "left")
                all_sum += (result.loss or 0.0) * total
                all_count += total
                if last:
                    last_sum += result.segment_losses[-1] * last
                    last_count += last
                tokens += len(ids)
                bar.update(n)  # segments read
        loss_all = all_sum / max(all_count, 1)
        loss_last = last_sum / max(last_count, 1)
        points.append(LengthPerplexity(n, tokens // max(count, 1), count, math.exp(loss_all), math.exp(loss_last),
                                       loss_all, loss_last, seconds, m.peak_memory_bytes, m.memory_kind))
    if own_bar:
        bar.close()
    return points
