"""Memory settings and the trainable memory parameters of the Recurrent Memory Transformer.

A long input is cut into segments of ``segment_size`` tokens. With the paper's memory
(``memory_kind="tokens"``, the default) each segment is processed as
``[memory + read_embedding ; segment ; memory + write_embedding]``; the backbone's last hidden
states at the write positions become the memory of the next segment. ``memory_tokens`` is the
initial memory. ``read_embedding`` and ``write_embedding`` start at zero, so an untrained model
computes exactly the reference RMT (Bulatov et al., arXiv 2207.06881 / 2304.11062).

With ``memory_kind="associative"`` (ARMT, rmt_peft/associative.py) each segment is
``[segment ; memory_tokens]`` and the memory is a matrix per decoder layer, written from the
memory tokens' states and read by every token of the next segment.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from .associative import AssociativeMemory

MEMORY_KINDS = ("tokens", "associative")
WRITE_COST_FORMS = ("gate", "softplus")
ALIGNMENTS = ("left", "right")
MEMORY_UPDATES = ("replace", "gated")
CHECKPOINT_POLICIES = ("recompute_all", "save_matmuls")
# the fields that act on a memory of tokens passed between segments (not on an associative one;
# the noise and the stability loss act on both)
TOKEN_MEMORY_LEVERS = ("memory_update", "memory_gate_bias")


@dataclass
class MemoryConfig:
    """How the input is segmented and how memory flows between segments.

    num_memory_tokens: memory size in tokens; 0 is the no-memory baseline (segments are
        processed independently).
    memory_kind: "tokens" (the paper's RMT: the memory is the write tokens' last hidden states,
        read back as the next segment's first tokens) or "associative" (ARMT, Rodkin et al. 2024:
        the memory tokens are written into an associative matrix per decoder layer that every
        token of the next segment reads; see rmt_peft/associative.py). memory_update and
        memory_gate_bias act on a memory of tokens and need "tokens"; the noise and the stability
        loss act on either kind.
    associative_key_size: with memory_kind="associative", the size of the keys each layer
        projects its hidden states to; the matrices hold 6 x this many features (DPFP of order 3)
        per hidden unit. The authors used 64 for GPT-2 and 32 for their tiny GPT-NeoX.
    associative_correction: with memory_kind="associative", a key written again grows the
        normaliser only by what is new about it (the authors' correction; on by default).
    associative_normalizer_floor: with memory_kind="associative", after each write every key
        feature's normaliser is at least that feature's value in each key written (ours; off by
        default, the authors' update). The correction judges a key as a whole, so a feature that
        only a mostly stored key has can get a row of the matrix and almost no normaliser; a
        query on it then reads that row divided by about 1e-5 (rows read up to 1e7 times the
        median were measured, BENCHMARKS.md). With the floor a row's read is bounded by what was
        written to it.
    associative_gate_noise: with memory_kind="associative", in training, logistic noise of this
        scale on each write gate's logit (the binary-concrete relaxation; 0 = off, 1 makes a
        half-open gate uniform on (0, 1)). The memory tokens write to nearly the same keys every
        segment, so a gate left slightly open on filler overwrites the fact a little each
        segment; under the noise, gates learn to sit far from half-open (docs/memory-model.md).
    associative_hard_gates: with memory_kind="associative", outside training (evaluation,
        streams, generate), each write gate is open (1) where its logit is positive and shut (0)
        elsewhere: a shut gate leaves the matrix as it is, so a fact is not worn away by segments
        whose gates stay shut, where soft gates let each of them overwrite a little of it. The
        normaliser grows as in training (soft gates do not gate it either). Training keeps the
        soft gates (they need a gradient); pair it with associative_gate_noise, which trains the
        gates to sit shut or open.
    associative_gate_threshold: with associative_hard_gates, a gate is open where its logit
        exceeds this instead of 0 (a gate at least sigmoid(threshold) open). Along the input many
        gates open just above 0 on filler, while a fact's own write opens them well above; at the
        CPU scale 0.5 held detect longer on every learned run that faded and cost the
        half-learned ones (BENCHMARKS.md, "A threshold for the hard gates"). An inference setting,
        read at each call like associative_hard_gates; 0 = the logit's sign.
    associative_hard_gates_in_training: with associative_hard_gates, training writes with the
        hard gates too (after associative_gate_noise, at associative_gate_threshold), their
        gradient passed straight through the soft gates (the straight-through estimator). Soft
        gates in training and hard ones at inference write differently: a gate a little open on
        filler wears a fact away in training and leaves it whole at inference, or a gate just
        under the threshold writes a share of a fact in training and nothing at inference. With
        this, what training writes is what inference writes. Off by default.
    associative_write_cost: with memory_kind="associative", in training, adds this weight times
        the mean write gate (over the layers, memory tokens, samples and segments; the noisy soft
        gates) to the loss: a write costs, so the memory learns to write when something new comes
        and to leave its matrices alone on filler. Without it, the delta rule lets a memory copy
        a fact forward every segment (read it, write it back to the same keys), which keeps it
        over the trained lengths and drifts beyond them (docs/memory-model.md); 0 = off.
    associative_write_cost_form: what the write cost charges per gate, from its logit x: "gate"
        (the default) the soft gate sigmoid(x), whose pull on x, sigmoid(x)(1 - sigmoid(x)), fades
        as the gate opens wide, so a confident write on filler is barely charged; "softplus"
        log(1 + e^x) = -log(1 - sigmoid(x)) (minus the log-probability that the gate is shut),
        whose pull on x is the gate itself, so the wider a gate opens the harder it is pulled shut.
    associative_forced_write_rate: with memory_kind="associative", in training, the probability
        that one layer's write gates are forced wide open for one sample at one segment (their
        gradient is then 0, and the write cost charges the gates as they were). Along a long
        input a gate now and then opens confidently on filler, and a memory whose writes on
        filler carry nothing of the fact loses it there (the GPU's detect runs that fade,
        BENCHMARKS.md); forced writes teach the memory to write what keeps the fact, so such a
        write does no harm. A training lever, as the write cost; 0 = off.
    associative_write_back_weight: with memory_kind="associative", in training, adds this weight
        times a write-back loss to the loss: per memory token, how far its value v is from what the
        matrix already holds under its key s, |v - s|^2 / (|v|^2 + |s|^2), times how shut its
        gate is (1 - gate; both s and the gate taken as they are, without a gradient), averaged
        as the write cost. A write of v = s leaves the matrix as it is whatever its gate, so a
        memory that carries s where it does not mean to write loses nothing when a gate opens on
        filler by mistake (what the GPU's detect runs that fade do, BENCHMARKS.md), and, unlike
        forced writes, training writes what it would write anyway. A training lever, as the
        write cost; 0 = off.
    segment_size: input tokens per segment (memory positions come on top).
    bptt_depth: None for full backpropagation through time; k >= 0 keeps the gradient of the
        last k memory transitions only (the memory entering segment i is detached unless
        i >= n - k, for n segments), so the loss of the last segment back-propagates through
        exactly k transitions. Aligned to the end because memory tasks put their loss there.
    checkpoint_segments: recompute each segment in the backward pass (non-reentrant activation
        checkpointing), so training memory does not grow with the number of segments. "auto":
        on a CUDA GPU, as many segments keep their activations as fit in the memory left, the
        others are recomputed (the flat path as fast as the memory allows): each forward keeps
        the first segment's activations, measures them, and ``segments_to_keep`` decides from
        the free memory (logged when the decision changes); ``uncheckpointed_segments`` is then
        not used. Where whole segments would be recomputed and ``from_backbone(compile=True)``
        compiled the graphs without a ``compile_memory_budget``, it lowers their activation
        budget instead (``activation_budget``) and compiles them again at the next step (again
        whenever a step with more segments does not fit).
        Elsewhere (the CPU) "auto" acts as true.
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
        fixed points of the update. 0 turns it off. With memory_kind="associative" the change
        measured is each layer's matrix's (``associative.relative_change``).
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
        recovers from perturbations instead of one that drifts; 0 turns it off. With
        memory_kind="associative" the noise goes on each layer's matrix (relative to each row's
        RMS; ``associative.perturb``): reads see errors like those of crosstalk between keys.
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
    memory_kind: str = "tokens"
    associative_key_size: int = 64
    associative_correction: bool = True
    associative_normalizer_floor: bool = False
    associative_gate_noise: float = 0.0
    associative_hard_gates: bool = False
    associative_gate_threshold: float = 0.0
    associative_hard_gates_in_training: bool = False
    associative_write_cost: float = 0.0
    associative_write_cost_form: str = "gate"
    associative_forced_write_rate: float = 0.0
    associative_write_back_weight: float = 0.0
    bptt_depth: int | None = None
    checkpoint_segments: bool | str = False
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
        need = self._need
        need(isinstance(self.num_memory_tokens, int) and self.num_memory_tokens >= 0,
             "num_memory_tokens", "expected an integer >= 0 (0 = no-memory baseline)")
        need(isinstance(self.segment_size, int) and self.segment_size >= 1,
             "segment_size", "expected an integer >= 1")
        need(self.memory_kind in MEMORY_KINDS, "memory_kind", f"expected one of {MEMORY_KINDS}")
        self._check_associative_fields()
        need(self.bptt_depth is None or (isinstance(self.bptt_depth, int) and self.bptt_depth >= 0),
             "bptt_depth", "expected None (full BPTT) or an integer >= 0")
        need(isinstance(self.checkpoint_segments, bool) or self.checkpoint_segments == "auto",
             "checkpoint_segments", "expected true, false or 'auto'")
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
        if self.memory_kind == "associative":
            need(self.num_memory_tokens >= 1, "num_memory_tokens",
                 "expected an integer >= 1 with memory_kind='associative' (the tokens it writes from)")
            defaults = {f.name: f.default for f in fields(self)}
            for name in TOKEN_MEMORY_LEVERS:
                need(getattr(self, name) == defaults[name], name,
                     f"it acts on a memory of tokens: leave it at {defaults[name]!r} with memory_kind='associative'")

    def _need(self, ok: bool, name: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"MemoryConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

    def _check_associative_fields(self) -> None:
        """The associative_* fields: each of the right type, and off unless memory_kind='associative'."""
        need = self._need
        need(isinstance(self.associative_key_size, int) and self.associative_key_size >= 1,
             "associative_key_size", "expected an integer >= 1")
        need(isinstance(self.associative_correction, bool), "associative_correction", "expected true or false")
        need(isinstance(self.associative_normalizer_floor, bool), "associative_normalizer_floor", "expected true or false")
        need(not self.associative_normalizer_floor or self.memory_kind == "associative", "associative_normalizer_floor",
             "it acts on the associative memory's normalisers: leave it false with memory_kind='tokens'")
        need(isinstance(self.associative_gate_noise, (int, float)) and not isinstance(self.associative_gate_noise, bool)
             and 0 <= self.associative_gate_noise < math.inf, "associative_gate_noise", "expected a number >= 0 (0 = off)")
        need(self.associative_gate_noise == 0 or self.memory_kind == "associative", "associative_gate_noise",
             "it acts on the associative memory's write gates: leave it at 0 with memory_kind='tokens'")
        need(isinstance(self.associative_hard_gates, bool), "associative_hard_gates", "expected true or false")
        need(not self.associative_hard_gates or self.memory_kind == "associative", "associative_hard_gates",
             "it acts on the associative memory's write gates: leave it false with memory_kind='tokens'")
        need(isinstance(self.associative_gate_threshold, (int, float))
             and not isinstance(self.associative_gate_threshold, bool)
             and math.isfinite(self.associative_gate_threshold), "associative_gate_threshold",
             "expected a finite number (a gate logit; 0 = its sign)")
        need(self.associative_gate_threshold == 0 or self.associative_hard_gates, "associative_gate_threshold",
             "it moves where the hard gates open: set associative_hard_gates=true (soft gates have no threshold)")
        need(isinstance(self.associative_hard_gates_in_training, bool), "associative_hard_gates_in_training",
             "expected true or false")
        need(not self.associative_hard_gates_in_training or self.associative_hard_gates,
             "associative_hard_gates_in_training", "it trains with the hard gates: set associative_hard_gates=true")
        need(isinstance(self.associative_write_cost, (int, float)) and not isinstance(self.associative_write_cost, bool)
             and 0 <= self.associative_write_cost < math.inf, "associative_write_cost",
             "expected a number >= 0 (0 = off)")
        need(self.associative_write_cost == 0 or self.memory_kind == "associative", "associative_write_cost",
             "it acts on the associative memory's write gates: leave it at 0 with memory_kind='tokens'")
        need(self.associative_write_cost_form in WRITE_COST_FORMS, "associative_write_cost_form",
             f"expected one of {WRITE_COST_FORMS}")
        need(self.associative_write_cost_form == "gate" or self.memory_kind == "associative",
             "associative_write_cost_form", "it shapes the associative memory's write cost: leave it 'gate' with "
             "memory_kind='tokens'")
        rate = self.associative_forced_write_rate
        need(isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 <= rate <= 1,
             "associative_forced_write_rate", "expected a probability from 0 to 1 (0 = off)")
        need(rate == 0 or self.memory_kind == "associative", "associative_forced_write_rate",
             "it forces the associative memory's write gates open: leave it at 0 with memory_kind='tokens'")
        weight = self.associative_write_back_weight
        need(isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 <= weight < math.inf,
             "associative_write_back_weight", "expected a number >= 0 (0 = off)")
        need(weight == 0 or self.memory_kind == "associative", "associative_write_back_weight",
             "it acts on the associative memory's writes: leave it at 0 with memory_kind='tokens'")

    @property
    def associative(self) -> bool:
        return self.memory_kind == "associative"

    @property
    def positions_per_segment(self) -> int:
        """Backbone positions one segment occupies: read memory (tokens kind only), tokens, write memory."""
        reads = 0 if self.associative else self.num_memory_tokens
        return self.segment_size + reads + self.num_memory_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MemoryConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MemoryConfig field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**values)


# checkpoint_segments="auto" leaves this share of the free memory spare: backward's own
# transients (gradients of a segment's activations, the loss chunks) and fragmentation
AUTO_CHECKPOINT_MARGIN = 0.10


def segments_to_keep(free_bytes: int, segment_bytes: int, num_segments: int,
                     margin: float = AUTO_CHECKPOINT_MARGIN) -> int:
    """How many of ``num_segments`` segments keep their activations under
    ``checkpoint_segments="auto"``, given the memory free before the segments ran and one
    segment's activations: as many as fit in ``free_bytes`` less ``margin``, at least 1. The
    kept ones are the first (it measured) and the last k - 1, whose backward runs first and
    frees them before any checkpointed segment is recomputed, so a recompute holds two segments
    (the first and itself), never more than k >= 2 do at the end of the forward."""
    usable = free_bytes * (1 - margin)
    if segment_bytes <= 0:
        return num_segments
    return max(1, min(num_segments, int(usable // segment_bytes)))


# checkpoint_segments="auto" with compiled graphs: a segment compiled at activation budget b held
# about b + 0.05 of what it held at 1 (H100, NF4 8 x 4: 0.35 -> 0.41, 0.3 -> 0.36; the rest is
# outside the graphs: embeddings, the loss's logits), so the budget asked is this share of the
# ratio that would just fit; never below the floor (graphs that keep almost nothing recompute
# almost every forward op, a whole extra forward).
AUTO_BUDGET_SHARE = 0.8
MIN_AUTO_BUDGET = 0.1


def activation_budget(free_bytes: int, segment_bytes: int, num_segments: int,
                      margin: float = AUTO_CHECKPOINT_MARGIN) -> float:
    """The compiled graphs' activation budget (``compile_memory_budget``) at which all
    ``num_segments`` keep their activations in ``free_bytes`` less ``margin``, given one segment's
    bytes measured at budget 1: ``AUTO_BUDGET_SHARE`` of the ratio, within [``MIN_AUTO_BUDGET``, 1].
    ``segments_to_keep`` then decides again from the segment measured at that budget."""
    if segment_bytes <= 0:
        return 1.0
    ratio = free_bytes * (1 - margin) / (num_segments * segment_bytes)
    return min(1.0, max(MIN_AUTO_BUDGET, AUTO_BUDGET_SHARE * ratio))


def allocated_bytes(device: torch.device) -> int | None:
    """Bytes torch has allocated on ``device``; None where it cannot tell (not a CUDA GPU)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def free_gpu_bytes(device: torch.device) -> int:
    """Bytes this process can still allocate on a CUDA ``device``: the device's free memory plus
    what torch's caching allocator holds unused, within ``torch.cuda.set_per_process_memory_fraction``."""
    if device.index is None:  # torch's memory-fraction calls need an index ("cuda" names the current GPU)
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    room = free + torch.cuda.memory_reserved(device) - allocated
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    return int(min(room, fraction * total - allocated))


def memory_tensor_shapes(config: MemoryConfig, hidden_size: int, num_layers: int = 0) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of ``MemoryParameters`` for ``config`` (what a saved memory
    holds); ``num_layers``: the backbone's decoder layers (the associative kind has a set each)."""
    m = config.num_memory_tokens
    shapes = {"memory_tokens": (m, hidden_size)}
    if config.associative:
        k = config.associative_key_size
        for i in range(num_layers):
            shapes.update({f"associative.layers.{i}.query.weight": (k, hidden_size),
                           f"associative.layers.{i}.key.weight": (k, hidden_size),
                           f"associative.layers.{i}.value.weight": (hidden_size, hidden_size),
                           f"associative.layers.{i}.gate.weight": (1, hidden_size),
                           f"associative.layers.{i}.gate.bias": (1,)})
        return shapes
    shapes.update(read_embedding=(m, hidden_size), write_embedding=(m, hidden_size))
    if config.memory_update == "gated":
        shapes.update(gate_weight=(hidden_size,), gate_bias=(m,))
    return shapes


class MemoryParameters(nn.Module):
    """The trainable memory. Tokens kind: the initial memory and the read/write embeddings, each
    (num_memory_tokens, hidden); with ``memory_update="gated"`` also the write gate (a weight over
    the hidden size and a bias per token). Associative kind: the memory tokens (written in every
    segment) and ``associative``, the projections of each decoder layer (``num_layers``)."""

    def __init__(self, config: MemoryConfig, hidden_size: int, init_std: float, num_layers: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        shape = (config.num_memory_tokens, hidden_size)
        self.memory_tokens = nn.Parameter(torch.randn(shape, dtype=dtype, device=device) * init_std)
        if config.associative:
            self.associative = AssociativeMemory(num_layers, hidden_size, config.associative_key_size,
                                                 config.associative_correction, dtype=dtype, device=device,
                                                 normalizer_floor=config.associative_normalizer_floor)
            return
        self.read_embedding = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.write_embedding = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        if config.memory_update == "gated":
            self.gate_weight = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device))
            self.gate_bias = nn.Parameter(torch.full((config.num_memory_tokens,), float(config.memory_gate_bias),
                                                     dtype=dtype, device=device))

    def initial_memory(self, batch_size: int):
        """The state before the first segment: (batch, tokens, hidden) tokens, or an empty
        ``AssociativeState``."""
        if hasattr(self, "associative"):
            return self.associative.initial_state(batch_size)
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
