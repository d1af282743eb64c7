"""Associative memory (ARMT: Rodkin et al. 2024, arXiv 2407.04841) beside the memory tokens.

With ``MemoryConfig(memory_kind="associative")`` each segment is processed as
``[segment ; memory tokens]`` (the learned memory tokens, the same in every segment), and every
decoder layer keeps an associative matrix ``A`` (key features x hidden) and a normaliser ``z``
(key features), both zero before the first segment. In each layer:

- **read** (before the layer, every position): ``h <- h + phi(h Wq) A / (phi(h Wq) . z + eps)``;
- **write** (after the layer, from its outputs ``m_j`` at the memory positions): keys
  ``k_j = phi(m_j Wk)``, values ``v_j = m_j Wv``, the value stored at the key so far
  ``v'_j = k_j A / (k_j . z + eps)``, a write gate ``b_j = sigmoid(m_j wb + bb)``; then
  ``A <- A + sum_j b_j k_j^T (v_j - v'_j)`` (the delta rule: a key written again replaces its
  value instead of adding to it) and ``z <- z + sum_j c_j k_j`` with the correction
  ``c_j = clip(1 - (k_j . z + eps) / |k_j|^2, 0, 1)`` (not differentiated): a key already
  stored barely grows the normaliser. With ``normalizer_floor`` (ours, off by default) then
  ``z <- max(z, max_j k_j)`` feature by feature: the correction looks at a key as a whole, so a
  feature that only a key mostly stored already has gets a row of ``A`` and almost no
  normaliser, and a query on it reads that row divided by about ``eps``.

``phi`` is DPFP (deterministic parameter-free projection) of order 3: ``2 * 3 * key_size``
non-negative features. ``Wv`` starts at zero, so an untrained associative memory reads nothing.

What is ours: the state lives in an ``AssociativeState`` that the caller passes in and gets back
(the authors keep it in module attributes), so it streams, saves, detaches for truncated BPTT
and checkpoints like the memory tokens' state; nothing hides between calls. The read and write
run in forward hooks of the backbone's decoder layers (its structure and LoRA names unchanged),
inside each block's compiled graph when the blocks are compiled (``speedups.compile_blocks``), active
only inside ``AssociativeMemory.session``. The state is fp32
(thousands of accumulated writes); the matmuls run in the backbone's dtype (or the caller's
autocast).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

DPFP_ORDER = 3  # the authors' nu
EPS = 1e-5      # the authors' denominator epsilon
FORCED_LOGIT = 30.0  # a gate forced open: its sigmoid is 1 in fp32 and bf16


def dpfp(x: torch.Tensor, order: int = DPFP_ORDER) -> torch.Tensor:
    """Deterministic parameter-free projection (Schlag et al. 2021): ``2 * order * d`` non-negative
    features of ``x`` (..., d), products of its positive and negative parts with shifted copies."""
    x = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    rolled = torch.cat([x.roll(shifts=j, dims=-1) for j in range(1, order + 1)], dim=-1)
    return torch.cat([x] * order, dim=-1) * rolled


@dataclass
class AssociativeState:
    """The associative memory after some segments: per decoder layer a matrix (batch, key
    features, hidden) and a normaliser (batch, key features), fp32. ``empty``: nothing written
    yet (the first segment then reads nothing and writes without a correction, exactly as the
    authors' first segment)."""

    matrices: tuple[torch.Tensor, ...]
    normalizers: tuple[torch.Tensor, ...]
    empty: bool = False
    # the mean write gate of the segment that made this state (a scalar with the graph), when its
    # session measured it (MemoryConfig.associative_write_cost); not part of the state's tensors
    write_gate: torch.Tensor | None = None
    # likewise the mean over the layers of write_back_loss (MemoryConfig.associative_write_back_weight)
    write_back: torch.Tensor | None = None

    @classmethod
    def zeros(cls, num_layers: int, batch_size: int, key_features: int, hidden_size: int,
              device: torch.device | str | None = None) -> "AssociativeState":
        matrix = torch.zeros(1, key_features, hidden_size, device=device).expand(batch_size, -1, -1)
        normalizer = torch.zeros(1, key_features, device=device).expand(batch_size, -1)
        return cls((matrix,) * num_layers, (normalizer,) * num_layers, empty=True)

    @property
    def batch_size(self) -> int:
        return self.matrices[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.matrices[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.matrices[0].dtype

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (*self.matrices, *self.normalizers)

    def with_tensors(self, tensors) -> "AssociativeState":
        """The same kind of state holding ``tensors`` (in the order of ``tensors()``)."""
        n = len(self.matrices)
        return replace(self, matrices=tuple(tensors[:n]), normalizers=tuple(tensors[n:]), write_gate=None,
                       write_back=None)

    def map(self, fn) -> "AssociativeState":
        return self.with_tensors([fn(t) for t in self.tensors()])

    def detach(self) -> "AssociativeState":
        return self.map(torch.Tensor.detach)

    def to(self, *args, **kwargs) -> "AssociativeState":
        """Moves between devices; the state stays fp32 whatever dtype is asked (it accumulates)."""
        kwargs.pop("dtype", None)
        args = [a for a in args if not isinstance(a, torch.dtype)]
        return self.map(lambda t: t.to(*args, **kwargs)) if args or kwargs else self

    def expand(self, batch_size: int) -> "AssociativeState":
        """A state of one sample expanded to ``batch_size`` samples (a view)."""
        if self.batch_size == batch_size:
            return self
        return self.map(lambda t: t.expand(batch_size, *t.shape[1:]))

    def where(self, keep_new: torch.Tensor, old: "AssociativeState") -> "AssociativeState":
        """Per sample (``keep_new``: (batch,) bool) this state or ``old``."""
        pick = [torch.where(keep_new.view(-1, *[1] * (new.dim() - 1)), new, prev)
                for new, prev in zip(self.tensors(), old.tensors())]
        return replace(self.with_tensors(pick), empty=self.empty and old.empty)

    def stacked(self) -> dict[str, torch.Tensor]:
        """{"matrices": (layers, batch, features, hidden), "normalizers": (layers, batch, features)}."""
        return {"matrices": torch.stack(self.matrices), "normalizers": torch.stack(self.normalizers)}

    @classmethod
    def from_stacked(cls, matrices: torch.Tensor, normalizers: torch.Tensor, empty: bool = False):
        return cls(tuple(matrices.unbind(0)), tuple(normalizers.unbind(0)), empty)


def read_memory(queries: torch.Tensor, matrix: torch.Tensor, normalizer: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """What every position reads from one layer's memory, ``phi(q) A / (phi(q) . z + eps)``, from
    its query projections ``queries`` (batch, tokens, key size), in ``dtype``. A function of
    tensors alone, so one compiled graph serves every layer."""
    features = dpfp(queries)
    found = torch.einsum("btk,bkh->bth", features, matrix.to(features.dtype))
    weight = torch.einsum("bk,btk->bt", normalizer.to(features.dtype), features)[..., None] + EPS
    return (found / weight).to(dtype)


def stored_values(features: torch.Tensor, matrix: torch.Tensor,
                  normalizer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the memory holds under each key, ``k A / (k . z + eps)`` (batch, m, hidden); the
    denominator (batch, m, 1)) from the keys' DPFP features (batch, m, features)."""
    weight = torch.einsum("bk,bmk->bm", normalizer.to(features.dtype), features)[..., None] + EPS
    return torch.einsum("bmk,bkh->bmh", features, matrix.to(features.dtype)) / weight, weight


def write_back_loss(keys: torch.Tensor, values: torch.Tensor, gates: torch.Tensor, matrix: torch.Tensor,
                    normalizer: torch.Tensor, empty: bool) -> torch.Tensor:
    """MemoryConfig.associative_write_back_weight's term for one layer's write (fp32): the mean over
    the memory tokens and samples of ``(1 - b) |v - s|^2 / (|v|^2 + |s|^2)``, with ``v`` a token's
    value, ``s`` what the memory already holds under its key (nothing before the first write) and
    ``b`` its gate from the logits ``gates``. Only ``v`` gets a gradient: the loss teaches the memory
    tokens to carry, where they do not mean to write, the value that a write would leave as it
    is (``v = s`` makes the delta rule's update zero whatever the gate), so a gate that opens on
    filler by mistake writes back what is there. The denominator is detached: a relative error,
    not a pull on ``v``'s size."""
    with torch.no_grad():
        shut = 1 - torch.sigmoid(gates.float())[..., 0]
    return (shut * write_back_error(keys, values, matrix, normalizer, empty)[0]).mean()


def write_back_error(keys: torch.Tensor, values: torch.Tensor, matrix: torch.Tensor, normalizer: torch.Tensor,
                     empty: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(each memory token's ``|v - s|^2 / (|v|^2 + |s|^2)`` (batch, m), fp32, with a gradient through
    ``v`` only; ``s`` (batch, m, hidden)): ``write_back_loss`` before its gates. Where nothing is
    stored (``s = 0``) it is 1 for any ``v`` but 0."""
    values = values.float()
    with torch.no_grad():
        stored = torch.zeros_like(values) if empty else stored_values(dpfp(keys).float(), matrix, normalizer)[0]
        scale = (values.pow(2).sum(-1) + stored.pow(2).sum(-1)).clamp(min=1e-12)
    return (values - stored).pow(2).sum(-1) / scale, stored


def write_memory(keys: torch.Tensor, values: torch.Tensor, gates: torch.Tensor, matrix: torch.Tensor,
                 normalizer: torch.Tensor, empty: bool, correction: bool,
                 hard_gates: bool = False, floor: bool = False,
                 gate_threshold: float = 0.0, straight_through: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's matrix and normaliser after writing, with the delta rule, the memory positions'
    key projections ``keys`` (batch, m, key size), values (batch, m, hidden) and gate logits
    (batch, m, 1). ``hard_gates``: each gate is 1 where its logit exceeds ``gate_threshold`` and 0
    elsewhere (the normaliser grows as with soft gates, which do not gate it: reads stay scaled as
    in training). ``straight_through`` (with ``hard_gates``): the gates write 0 or 1 as hard gates do,
    and their gradient is the soft gates' (the straight-through estimator), so training writes as
    inference does.
    ``floor``: each feature's normaliser is then at least that feature of every key written."""
    keys = dpfp(keys)
    if empty:
        stored, coefficient = torch.zeros_like(values), 1.0
    else:
        stored, weight = stored_values(keys, matrix, normalizer)
        coefficient = 1.0
        if correction:
            coefficient = torch.clip(1 - weight / (torch.linalg.norm(keys, dim=-1) ** 2 + EPS)[..., None],
                                     0, 1).detach()
            # a sample with nothing written yet (padding so far) writes as a first segment does
            started = (normalizer != 0).any(dim=-1)[:, None, None]
            coefficient = torch.where(started, coefficient, torch.ones_like(coefficient))
    if hard_gates:
        weights = (gates > gate_threshold).to(keys.dtype)
        if straight_through:
            soft = torch.sigmoid(gates)
            weights = soft + (weights - soft).detach()
    else:
        weights = torch.sigmoid(gates)
    update = torch.einsum("bmk,bmh,bm->bkh", keys, values - stored, weights[..., 0])
    grown = normalizer + (coefficient * keys).sum(dim=1).float()
    if floor:
        grown = torch.maximum(grown, keys.amax(dim=1).float())
    return matrix + update.float(), grown


def relative_change(old: AssociativeState, new: AssociativeState, tolerance: float = 0.0,
                    power: float = 1.0) -> torch.Tensor:
    """The stability loss's measure on an associative memory: per layer and sample,
    ``c = r ** power`` with ``r = |A_new - A_old|^2 / max(|A_old|^2, |A_new|^2)`` (the whole matrix;
    or ``c / (c + tolerance)`` when tolerance > 0), averaged over the layers and the samples that had
    something written before (``A_old`` of a sample that has not begun is zero: its first write is
    not a drift). The larger norm, not the old one: a matrix starts at zero (``Wv`` does) and stays
    near it early in training, where the change relative to ``A_old`` alone is unbounded; so ``r``
    is at most 4, and for small changes it is the relative change."""
    started = (old.normalizers[0] != 0).any(dim=-1)
    changes = []
    for before, after in zip(old.matrices, new.matrices):
        before, after = before.float(), after.float()
        scale = torch.maximum(before.pow(2).sum((-2, -1)), after.pow(2).sum((-2, -1)))
        change = (after - before).pow(2).sum((-2, -1)) / scale.clamp(min=1e-12)
        if power != 1:
            change = change.clamp(min=1e-12).pow(power)  # finite slope where nothing changed
        if tolerance > 0:
            change = change / (change + tolerance)
        changes.append(torch.where(started, change, torch.zeros_like(change)))
    return torch.stack(changes).sum() / (started.sum() * len(changes)).clamp(min=1)


def perturb(state: AssociativeState, std: float) -> AssociativeState:
    """``state`` with Gaussian noise of ``std`` times each matrix row's RMS on every layer's matrix
    (rows no key has touched stay zero); the normalisers are left as they are. The training noise
    of ``memory_noise_std``: reads see the kind of error that crosstalk between stored keys brings."""
    matrices = []
    for matrix in state.matrices:
        rms = matrix.detach().pow(2).mean(dim=-1, keepdim=True).sqrt()
        matrices.append(matrix + std * rms * torch.randn_like(matrix))
    return replace(state, matrices=tuple(matrices))


def logistic_noise(like: torch.Tensor) -> torch.Tensor:
    """Standard logistic noise shaped like ``like`` (``log u - log(1 - u)``, u uniform): added to a
    gate's logit, as in the binary-concrete relaxation, ``sigmoid`` of a zero logit is uniform on (0, 1)."""
    u = torch.rand_like(like, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)
    return (u.log() - (-u).log1p()).to(like.dtype)


def force_open(gates: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gate logits (batch, m, 1) with each sample's gates forced wide open with probability
    ``rate`` (all of a sample's gates together): MemoryConfig.associative_forced_write_rate."""
    forced = torch.rand(gates.shape[0], 1, 1, device=gates.device, generator=generator) < rate
    return torch.where(forced, torch.full_like(gates, FORCED_LOGIT), gates)


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose call is its weight alone: no hooks, no partitioned weight."""
    return (type(module) is nn.Linear and not module._forward_pre_hooks and not module._forward_hooks
            and not hasattr(module.weight, "ds_id"))


class AssociativeLayer(nn.Module):
    """The trainable projections of one decoder layer's associative memory (the authors'
    W_mq, W_mk, W_mv, W_mb)."""

    def __init__(self, hidden_size: int, key_size: int, dtype=torch.float32, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.query = nn.Linear(hidden_size, key_size, bias=False, **kw)
        self.key = nn.Linear(hidden_size, key_size, bias=False, **kw)
        self.value = nn.Linear(hidden_size, hidden_size, bias=False, **kw)
        self.gate = nn.Linear(hidden_size, 1, **kw)
        nn.init.zeros_(self.value.weight)

    def _precision(self, hidden: torch.Tensor):
        """The matmuls run in the backbone's dtype (bf16 hidden states: bf16 matmuls, as every other
        matmul of the layer; fp32 ones for exactness with the authors' code); the state stays fp32.
        A caller's autocast decides by itself."""
        device = hidden.device.type
        if torch.is_autocast_enabled(device) or hidden.dtype == self.query.weight.dtype:
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=hidden.dtype)

    def read(self, hidden: torch.Tensor, matrix: torch.Tensor, normalizer: torch.Tensor,
             kernel=read_memory) -> torch.Tensor:
        """What every position (batch, tokens, hidden) reads from the memory, in ``hidden``'s dtype."""
        if matrix.shape[0] != hidden.shape[0]:  # generate() with several beams or sequences per sample
            repeat = hidden.shape[0] // matrix.shape[0]
            matrix, normalizer = matrix.repeat_interleave(repeat, 0), normalizer.repeat_interleave(repeat, 0)
        # the projections are module calls (ZeRO-3 gathers a weight only for its module's call)
        with self._precision(hidden):
            return kernel(self.query(hidden), matrix, normalizer, hidden.dtype)

    def write_projections(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The keys, values and gate logits of the memory positions, as one matmul with the three
        weights stacked: a training step is host-bound on the GPU, and each separate projection
        costs a weight cast and a matmul launch forward and three backward in every layer call.
        Modules whose call does more than their weight (hooks: DeepSpeed ZeRO-3 gathers its
        partitioned weights in them; a wrapper such as a LoRA layer) are called one by one."""
        modules = (self.key, self.value, self.gate)
        if not all(_plain_linear(m) for m in modules):
            return tuple(m(memory) for m in modules)
        k, h = self.key.out_features, self.value.out_features
        weight = torch.cat([self.key.weight, self.value.weight, self.gate.weight])
        bias = torch.cat([self.gate.bias.new_zeros(k + h), self.gate.bias])
        projected = F.linear(memory, weight, bias)
        return projected[..., :k], projected[..., k:k + h], projected[..., k + h:]

    def write(self, memory: torch.Tensor, matrix: torch.Tensor, normalizer: torch.Tensor, empty: bool,
              correction: bool, kernel=write_memory, gate_noise: float = 0.0,
              hard_gates: bool = False, measure_gates: bool = False, floor: bool = False,
              gate_threshold: float = 0.0, hard_in_training: bool = False,
              cost_form: str = "gate", forced_rate: float = 0.0,
              measure_write_back: bool = False) -> tuple[torch.Tensor, ...]:
        """The matrix and normaliser after writing the memory positions' outputs (batch, m, hidden);
        in training, ``gate_noise`` times logistic noise on the gates' logits; outside training,
        with ``hard_gates``, each gate open where its logit exceeds ``gate_threshold`` and shut
        elsewhere (``write_memory``); in training too with ``hard_in_training`` (the gradient
        straight through the soft gates).
        ``measure_gates`` or ``measure_write_back``: two more outputs, fp32 (None where not
        measured): what the write cost charges (``cost_form`` as
        MemoryConfig.associative_write_cost_form): the mean soft gate, or the mean softplus of the
        gates' logits (the noisy ones in training); and ``write_back_loss`` (gated by the gates
        before their noise); ``floor``: the normaliser's floor (``write_memory``);
        ``forced_rate``: in training, each sample's gates forced open with this probability
        (MemoryConfig.associative_forced_write_rate), charged by the cost as they were."""
        with self._precision(memory):
            keys, values, gates = self.write_projections(memory)
            back = write_back_loss(keys, values, gates, matrix, normalizer, empty) if measure_write_back else None
            if gate_noise and self.training:
                gates = gates + gate_noise * logistic_noise(gates)
            charged_logits = gates
            if forced_rate and self.training:
                gates = force_open(gates, forced_rate)
            straight_through = hard_in_training and self.training
            written = kernel(keys, values, gates, matrix, normalizer, empty, correction,
                             hard_gates and (straight_through or not self.training), floor, gate_threshold,
                             straight_through)
        if not (measure_gates or measure_write_back):
            return written
        charged = None
        if measure_gates:
            logits = charged_logits.float()
            charged = (torch.sigmoid(logits) if cost_form == "gate" else F.softplus(logits)).mean()
        return (*written, charged, back)


class _Session:
    """One call of the backbone with the associative memory active: the state every layer reads,
    and, when ``write_tokens`` > 0, what each layer writes from its last ``write_tokens`` positions
    and how (``AssociativeLayer.write``). ``written`` is filled when the session ends."""

    def __init__(self, state: AssociativeState, write_tokens: int, correction: bool, gate_noise: float,
                 hard_gates: bool, measure_gates: bool, gate_threshold: float = 0.0,
                 hard_in_training: bool = False, cost_form: str = "gate", forced_rate: float = 0.0,
                 measure_write_back: bool = False):
        self.empty, self.write_tokens, self.correction = state.empty, write_tokens, correction
        self.gate_noise, self.hard_gates, self.measure_gates = gate_noise, hard_gates, measure_gates
        self.gate_threshold, self.hard_in_training, self.cost_form = gate_threshold, hard_in_training, cost_form
        self.forced_rate, self.measure_write_back = forced_rate, measure_write_back
        self.written: list[tuple[torch.Tensor, ...] | None] = [None] * len(state.matrices)

    def result(self) -> AssociativeState:
        if any(w is None for w in self.written):
            missing = [i for i, w in enumerate(self.written) if w is None]
            raise RuntimeError(f"the associative memory of decoder layers {missing} was not written: the backbone "
                               f"did not call them (layer drop?)")
        gate = torch.stack([w[2] for w in self.written]).mean() if self.measure_gates else None
        back = torch.stack([w[3] for w in self.written]).mean() if self.measure_write_back else None
        return AssociativeState(tuple(w[0] for w in self.written), tuple(w[1] for w in self.written),
                                write_gate=gate, write_back=back)


class _Slot:
    """What one decoder layer's hooks use in a session: its projections, the matrix and normaliser
    it reads, what it wrote. The hooks reach their layer's data through their own slot, never by
    an index into the state: traced into a compiled block, an index is a constant of the graph,
    and each of the backbone's layers would compile a graph of its own."""

    def __init__(self, layer: AssociativeLayer):
        self.layer = layer
        self.matrix = self.normalizer = self.written = None


class AssociativeMemory(nn.Module):
    """One ``AssociativeLayer`` per decoder layer, and the hooks that run them inside the backbone.

    ``attach(blocks)`` hooks the decoder layers; the hooks do nothing outside ``session(...)``,
    so the backbone called on its own computes as before."""

    def __init__(self, num_layers: int, hidden_size: int, key_size: int, correction: bool = True,
                 dtype=torch.float32, device=None, normalizer_floor: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(AssociativeLayer(hidden_size, key_size, dtype, device) for _ in range(num_layers))
        self.correction, self.normalizer_floor = correction, normalizer_floor
        self.key_features = 2 * DPFP_ORDER * key_size
        self._session: _Session | None = None  # the backbone call in progress (see session)
        self._slots = [_Slot(layer) for layer in self.layers]
        self._handles: list = []

    def initial_state(self, batch_size: int) -> AssociativeState:
        weight = self.layers[0].value.weight
        return AssociativeState.zeros(len(self.layers), batch_size, self.key_features, weight.shape[1],
                                      device=weight.device)

    def attach(self, blocks: list[nn.Module]) -> None:
        """Hook the decoder layers (``blocks``, one per associative layer, in order)."""
        if len(blocks) != len(self.layers):
            raise ValueError(f"the backbone has {len(blocks)} decoder layers, the associative memory "
                             f"{len(self.layers)}")
        for handle in self._handles:
            handle.remove()
        self._handles[:] = []
        for index, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(_ReadHook(self, index), with_kwargs=True))
            self._handles.append(block.register_forward_hook(_WriteHook(self, index)))

    @contextlib.contextmanager
    def session(self, state: AssociativeState, write_tokens: int = 0, gate_noise: float = 0.0,
                hard_gates: bool = False, measure_gates: bool = False, gate_threshold: float = 0.0,
                hard_in_training: bool = False, cost_form: str = "gate", forced_rate: float = 0.0,
                measure_write_back: bool = False):
        """Inside: each decoder layer reads ``state``; with ``write_tokens`` it writes from its last
        ``write_tokens`` positions (``session.result()`` after the call gives the new state), with
        ``gate_noise``, ``hard_gates``, ``gate_threshold`` and ``hard_in_training`` as MemoryConfig's
        associative_gate_noise, associative_hard_gates, associative_gate_threshold and
        associative_hard_gates_in_training (the caller's
        config at this call, so changing it takes effect);
        ``measure_gates``: the new state's ``write_gate`` is the mean over the layers of what the
        write cost charges (``cost_form``: the soft gates, or the softplus of their logits);
        ``forced_rate`` as MemoryConfig.associative_forced_write_rate; ``measure_write_back``: the new
        state's ``write_back`` is the mean over the layers of ``write_back_loss``."""
        if self._session is not None:
            raise RuntimeError("an associative memory session is already active (a nested backbone call)")
        session = _Session(state, write_tokens, self.correction, gate_noise, hard_gates, measure_gates, gate_threshold,
                           hard_in_training, cost_form, forced_rate, measure_write_back)
        for slot, matrix, normalizer in zip(self._slots, state.matrices, state.normalizers):
            slot.matrix, slot.normalizer, slot.written = matrix, normalizer, None
        self._session = session
        try:
            yield session
        finally:
            self._session = None
            session.written = [slot.written for slot in self._slots]
            for slot in self._slots:  # the slots must not keep this segment's tensors alive
                slot.matrix = slot.normalizer = slot.written = None


class _ReadHook:
    """Forward pre-hook of decoder layer ``index``: its input plus what it reads from the memory.
    Traced into the block's graph when the block is compiled (one graph serves every layer:
    see ``_Slot``)."""

    def __init__(self, owner: AssociativeMemory, index: int):
        self.owner, self.index, self.slot = owner, index, owner._slots[index]
        self.kernel = read_memory

    def __call__(self, block, args, kwargs):
        session = self.owner._session
        if session is None or session.empty:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        slot = self.slot
        read = slot.layer.read(hidden, slot.matrix, slot.normalizer, self.kernel)
        if args:
            return (hidden + read, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden + read}


class _WriteHook:
    """Forward hook of decoder layer ``index``: writes its outputs at the memory positions."""

    def __init__(self, owner: AssociativeMemory, index: int):
        self.owner, self.index, self.slot = owner, index, owner._slots[index]
        self.kernel = write_memory

    def __call__(self, block, args, output):
        session = self.owner._session
        if session is None or not session.write_tokens:
            return None
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        slot = self.slot
        slot.written = slot.layer.write(hidden[:, -session.write_tokens:], slot.matrix, slot.normalizer,
                                        session.empty, session.correction, self.kernel, session.gate_noise,
                                        session.hard_gates, session.measure_gates, self.owner.normalizer_floor,
                                        session.gate_threshold, session.hard_in_training, session.cost_form,
                                        session.forced_rate, session.measure_write_back)
        return None
