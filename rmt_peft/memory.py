"""Memory settings and the three trainable memory parameters of the Recurrent Memory Transformer.

A long input is cut into segments of ``segment_size`` tokens. Each segment is processed as
``[memory + read_embedding ; segment ; memory + write_embedding]``; the backbone's last hidden
states at the write positions become the memory of the next segment. ``memory_tokens`` is the
initial memory. ``read_embedding`` and ``write_embedding`` start at zero, so an untrained model
computes exactly the reference RMT (Bulatov et al., arXiv 2207.06881 / 2304.11062).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

ALIGNMENTS = ("left", "right")
MEMORY_UPDATES = ("replace", "gated")
CHECKPOINT_POLICIES = ("recompute_all", "save_matmuls")


@dataclass
class MemoryConfig:
    """How the input is segmented and how memory flows between segments.

    num_memory_tokens: memory size in tokens; 0 is the no-memory baseline (segments are
        processed independently).
    segment_size: input tokens per segment (memory positions come on top).
    bptt_depth: None for full backpropagation through time; k >= 0 keeps the gradient of the
        last k memory transitions only (the memory entering segment i is detached unless
        i >= n - k, for n segments), so the loss of the last segment back-propagates through
        exactly k transitions. Aligned to the end because memory tasks put their loss there.
    checkpoint_segments: recompute each segment in the backward pass (non-reentrant activation
        checkpointing), so training memory does not grow with the number of segments.
    segment_alignment: "left" cuts segments from the first token (the last segment may be
        short; pair with right padding); "right" cuts from the last token (the first segment may
        be short; pair with left padding).
    loss_segments: None puts the loss on every segment; k > 0 only on the last k segments.
    memory_init_std: std of the initial memory; None takes the std of the embedding matrix,
        like the reference implementation.
    loss_chunk_size: labelled positions per chunk of the loss, so full-vocabulary fp32 logits
        never exist for a whole segment.
    memory_update: "replace" (the paper): the write outputs are the next memory; "gated": the
        next memory is ``memory + g * (write - memory)`` with a learned gate ``g`` in (0, 1) per
        memory token, computed from the write output, so keeping the memory unchanged is an
        exact path the model can learn (no final-norm rescaling compounding over thousands of
        segments).
    memory_gate_bias: the gate's initial bias (``g = sigmoid(bias)`` at init): 0 starts at 0.5.
    memory_stability_weight: in training, adds this weight times the memory's mean relative
        squared change from one segment to the next (every transition after the first) to the
        loss. A memory trained on a few segments keeps its facts but drifts over thousands of
        updates into states the readout never saw; this pulls the states it reaches towards
        fixed points of the update. 0 turns it off.
    memory_stability_tolerance: 0 penalises the relative squared change r itself; tau > 0
        penalises r / (r + tau) instead: small drifts cost steeply (slope 1 / tau) while a large
        deliberate write (a new fact, r >> tau) costs at most the weight and is not held back.
    memory_stability_power: the penalty is r ** power (before the tolerance). 1 penalises the
        squared relative change; 0.5 the relative change itself (|new - old| / |old|, a total
        variation over segments): its pull towards zero does not fade as the drift shrinks, and
        a rare large write (a new fact arriving mid-input) costs linearly, not quadratically, so
        the memory learns to change seldom but fully.
    memory_noise_std: in training, Gaussian noise of this std (relative to each memory token's
        RMS) is added to the memory passed between segments, so the model learns a memory that
        recovers from perturbations instead of one that drifts; 0 turns it off.
    uncheckpointed_segments: with checkpoint_segments, the last N segments of a forward keep
        their activations instead of being recomputed. Their backward comes first, so the last
        one is free (the peak is one segment's activations either way) and each further one
        costs one segment's activations; each saves one segment's recompute. Exact.
    checkpoint_policy: with checkpoint_segments, "recompute_all" (memory flat in the number of
        segments) or "save_matmuls" (selective checkpointing: the outputs of matmuls and
        attention, except the LM head's, are kept and only the cheap rest is recomputed: faster,
        memory grows with the segments by about half of what no checkpointing costs). Exact.
    """

    num_memory_tokens: int = 10
    segment_size: int = 512
    bptt_depth: int | None = None
    checkpoint_segments: bool = False
    segment_alignment: str = "left"
    loss_segments: int | None = None
    memory_init_std: float | None = None
    loss_chunk_size: int = 1024
    memory_update: str = "replace"
    memory_gate_bias: float = 0.0
    memory_noise_std: float = 0.0
    memory_stability_weight: float = 0.0
    memory_stability_tolerance: float = 0.0
    memory_stability_power: float = 1.0
    uncheckpointed_segments: int = 1
    checkpoint_policy: str = "recompute_all"

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"MemoryConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        need(isinstance(self.num_memory_tokens, int) and self.num_memory_tokens >= 0,
             "num_memory_tokens", "expected an integer >= 0 (0 = no-memory baseline)")
        need(isinstance(self.segment_size, int) and self.segment_size >= 1,
             "segment_size", "expected an integer >= 1")
        need(self.bptt_depth is None or (isinstance(self.bptt_depth, int) and self.bptt_depth >= 0),
             "bptt_depth", "expected None (full BPTT) or an integer >= 0")
        need(isinstance(self.checkpoint_segments, bool), "checkpoint_segments", "expected true or false")
        need(self.segment_alignment in ALIGNMENTS, "segment_alignment", f"expected one of {ALIGNMENTS}")
        need(self.loss_segments is None or (isinstance(self.loss_segments, int) and self.loss_segments >= 1),
             "loss_segments", "expected None (all segments) or an integer >= 1")
        need(self.memory_init_std is None or self.memory_init_std > 0,
             "memory_init_std", "expected None (embedding std) or a positive number")
        need(isinstance(self.loss_chunk_size, int) and self.loss_chunk_size >= 1,
             "loss_chunk_size", "expected an integer >= 1")
        need(self.memory_update in MEMORY_UPDATES, "memory_update", f"expected one of {MEMORY_UPDATES}")
        need(isinstance(self.memory_gate_bias, (int, float)) and math.isfinite(self.memory_gate_bias),
             "memory_gate_bias", "expected a finite number")
        need(isinstance(self.memory_noise_std, (int, float)) and 0 <= self.memory_noise_std < math.inf,
             "memory_noise_std", "expected a number >= 0 (0 = no noise)")
        need(isinstance(self.memory_stability_weight, (int, float)) and 0 <= self.memory_stability_weight < math.inf,
             "memory_stability_weight", "expected a number >= 0 (0 = off)")
        need(isinstance(self.memory_stability_tolerance, (int, float)) and 0 <= self.memory_stability_tolerance < math.inf,
             "memory_stability_tolerance", "expected a number >= 0 (0 = the plain relative squared change)")
        need(isinstance(self.memory_stability_power, (int, float)) and 0 < self.memory_stability_power <= 1,
             "memory_stability_power", "expected a number in (0, 1] (1 = squared change, 0.5 = change)")
        need(isinstance(self.uncheckpointed_segments, int) and self.uncheckpointed_segments >= 0,
             "uncheckpointed_segments", "expected an integer >= 0")
        need(self.checkpoint_policy in CHECKPOINT_POLICIES, "checkpoint_policy",
             f"expected one of {CHECKPOINT_POLICIES}")

    @property
    def positions_per_segment(self) -> int:
        """Backbone positions one segment occupies: read memory, tokens, write memory."""
        return self.segment_size + 2 * self.num_memory_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MemoryConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MemoryConfig field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**values)


def memory_tensor_shapes(config: MemoryConfig, hidden_size: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of ``MemoryParameters`` for ``config`` (what a saved memory holds)."""
    m = config.num_memory_tokens
    shapes = {"memory_tokens": (m, hidden_size), "read_embedding": (m, hidden_size), "write_embedding": (m, hidden_size)}
    if config.memory_update == "gated":
        shapes.update(gate_weight=(hidden_size,), gate_bias=(m,))
    return shapes


class MemoryParameters(nn.Module):
    """The initial memory and the read/write embeddings, each (num_memory_tokens, hidden); with
    ``update="gated"`` also the write gate (a weight over the hidden size and a bias per token)."""

    def __init__(self, num_memory_tokens: int, hidden_size: int, init_std: float,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 update: str = "replace", gate_bias: float = 0.0):
        super().__init__()
        shape = (num_memory_tokens, hidden_size)
        self.memory_tokens = nn.Parameter(torch.randn(shape, dtype=dtype, device=device) * init_std)
        self.read_embedding = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.write_embedding = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        if update == "gated":
            self.gate_weight = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device))
            self.gate_bias = nn.Parameter(torch.full((num_memory_tokens,), float(gate_bias), dtype=dtype,
                                                     device=device))

    def initial_memory(self, batch_size: int) -> torch.Tensor:
        return self.memory_tokens.unsqueeze(0).expand(batch_size, -1, -1)

    def update(self, memory: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
        """The next memory from the current one and the write outputs (batch, tokens, hidden)."""
        if not hasattr(self, "gate_weight"):
            return written.to(memory.dtype)
        written = written.to(memory.dtype)
        gate = torch.sigmoid(written @ self.gate_weight.to(memory.dtype) + self.gate_bias.to(memory.dtype))
        return memory + gate.unsqueeze(-1) * (written - memory)


def relative_change(old: torch.Tensor, new: torch.Tensor, tolerance: float = 0.0, power: float = 1.0) -> torch.Tensor:
    """Mean over batch and memory tokens of c = r ** power with r = |new - old|^2 / |old|^2 (fp32),
    or of c / (c + tolerance) when tolerance > 0."""
    old, new = old.float(), new.float()
    change = (new - old).pow(2).sum(-1) / old.pow(2).sum(-1).clamp(min=1e-12)
    if power != 1:
        # the clamp keeps the gradient finite where nothing changed (r ** 0.5 has slope inf at 0)
        change = change.clamp(min=1e-12).pow(power)
    if tolerance > 0:
        change = change / (change + tolerance)
    return change.mean()


def perturb(memory: torch.Tensor, std: float) -> torch.Tensor:
    """``memory`` plus Gaussian noise of ``std`` times each memory token's RMS."""
    rms = memory.detach().float().pow(2).mean(dim=-1, keepdim=True).sqrt().to(memory.dtype)
    return memory + std * rms * torch.randn_like(memory)
