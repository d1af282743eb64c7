"""Frozen linear layers whose weights stay quantized in memory and are dequantized inside each matmul.

``quantize_linears(model, quantization)`` replaces the linear layers of a loaded model (not its
LM head: ``rmt_peft.quantized_embedding`` holds it with the embeddings) by ``QuantizedLinear``:
an ``nn.Linear`` (so peft's LoRA wraps it as usual) holding one of three formats:

- "8bit": int8 per output channel (symmetric, absmax / 127) and one fp32 scale per row:
  1 byte per weight. The weight is dequantized into the compute dtype for each matmul.
- "4bit": torchao's NF4 (QLoRA's normal float in blocks of 64, with the blocks' scales
  quantized again in blocks of up to 256): about 0.52 bytes per weight. torchao quantizes;
  the layer keeps its tensors as plain buffers and dequantizes them with torchao's arithmetic
  (torchao's own ``linear_nf4`` lets compile keep a bf16 copy per call, see below).
- "fp8": float8 e4m3 per output channel, 1 byte per weight; the forward matmuls run at FP8 rate
  (``torch._scaled_mm``), each row of the input scaled to e4m3 on the fly; backward multiplies
  by the dequantized weight, as the other formats do. Needs FP8 tensor cores (``check_fp8``).

Why not bitsandbytes: its layers dequantize through Python and ctypes on every call, which
makes RMT training (every layer called once per segment, forward and backward) CPU-bound,
and ``torch.compile`` cannot fuse them. Here the dequantization is plain torch ops: a compiled
block turns it into one kernel feeding cuBLAS. Each autograd function keeps only the quantized
weight for backward and dequantizes again there (grad @ dequant(W)), so no call holds a bf16
copy of a weight, eager or compiled.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._triton import has_triton

from .errors import UserError

FORMATS = ("8bit", "4bit", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # QLoRA's (and torchao's default) block sizes


def torchao_to_nf4():
    """torchao's ``to_nf4`` (it moved in torchao 0.18)."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        try:  # torchao < 0.18
            from torchao.dtypes.nf4tensor import to_nf4
        except ImportError as err:
            raise UserError("quantization='4bit' with quantization_backend='torch' needs torchao (pip install "
                            "torchao>=0.18); or use quantization_backend='bitsandbytes'") from err
    return to_nf4


def torchao_available() -> bool:
    try:
        torchao_to_nf4()
    except UserError:
        return False
    return True


# -- the formats ---------------------------------------------------------------------------
# Each dequantization takes ``swap``: the backward's is written differently (the factors of its
# last product swapped, NF4's bytes unpacked in pairs), with the same values. torch.compile merges
# identical expressions of the forward and the backward; merged, the dequantized weight (or NF4's
# unpacked indices) would be "materialized in backward", and AOTAutograd then saves a copy of it
# at every call instead of recomputing it from the quantized weight, which it holds anyway
# (tests/test_quantized_linear.py checks what a compiled layer saves).
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per row (out, 1)): weight ~ int8 * scale."""
    scale = weight.detach().float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return (weight.detach().float() / scale).round().clamp(-127, 127).to(torch.int8), scale


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, fp32 scale per row (out, 1)): weight ~ e4m3 * scale; each row's largest
    magnitude maps to 448, the largest e4m3 value."""
    scale = weight.detach().float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (weight.detach().float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_scaled(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                      swap: bool = False) -> torch.Tensor:
    """int8 / e4m3 weight times its per-row scale, in fp32, rounded once to ``dtype``."""
    if torch.compiler.is_compiling():  # inside a compiled block: fused with its neighbours
        product = scale * qweight.float() if swap else qweight.float() * scale
        return product.to(dtype)
    # Eagerly (the int8 LM head, twice per chunk of the loss; streams; uncompiled layers) the three
    # steps above each go through memory: 19 bytes a weight. On a GPU one compiled kernel moves 3;
    # elsewhere one mul computing in fp32 and storing in ``dtype`` (e4m3, which torch does not
    # promote, read as fp32 first). The three steps took 8% of an H100 training step's kernel time
    # with GPT-Neo-1.3B's int8 head (BENCHMARKS.md, issue 25, "Eighth pass").
    if qweight.is_cuda and has_triton():  # what compile needs for a GPU kernel (not on every platform)
        return _fused_dequantize()(qweight, scale, dtype)
    values = qweight if qweight.dtype == torch.int8 else qweight.float()
    return torch.mul(values, scale, out=torch.empty(qweight.shape, dtype=dtype, device=qweight.device))


def _scaled_product(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (qweight.float() * scale).to(dtype)


@functools.cache
def _fused_dequantize():
    """``_scaled_product`` compiled once for every shape: on an H100, GPT-Neo-1.3B's int8 head in
    0.23 ms, against 0.42 ms for the one eager mul (mixed dtypes take torch's unvectorized path)
    and 0.85 ms for the three steps."""
    return torch.compile(_scaled_product, dynamic=True, fullgraph=True)


def nf4_scaler_block(numel: int) -> int | None:
    """The scaler block size for a weight of ``numel`` elements (None: not NF4-quantizable).
    torchao needs the number of 64-element blocks divisible by it: 256 for real layers, a
    smaller power of two for small ones."""
    if numel % NF4_BLOCK:
        return None
    return math.gcd(numel // NF4_BLOCK, NF4_SCALER_BLOCK)


def quantize_nf4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """torchao's NF4 of ``weight`` as plain tensors: "packed" (two 4-bit indices a byte, high
    nibble first), "scalers" (each 64-block's absmax, less their mean, in int8), "factors" (one
    int8 scale per block of scalers), "mean" and "values" (the 16 NF4 values), in ``weight``'s dtype."""
    nf4 = torchao_to_nf4()(weight.detach().contiguous(), NF4_BLOCK, nf4_scaler_block(weight.numel()))
    return {"packed": nf4.quantized_data, "scalers": nf4.quantized_scalers, "factors": nf4.quantization_factor,
            "mean": nf4.scaler_mean, "values": nf4.nf4}


def dequantize_nf4(packed: torch.Tensor, scalers: torch.Tensor, factors: torch.Tensor, mean: torch.Tensor,
                   values: torch.Tensor, shape: tuple[int, int], swap: bool = False) -> torch.Tensor:
    """The NF4 weight of ``shape`` in the dtype of ``values``: torchao's ``get_original_weight``,
    with the same arithmetic, on plain tensors (no tensor subclass for compile or peft to handle)."""
    if swap:  # byte pairs: the same order of indices, computed from another node than the forward's
        packed = packed.view(-1, 2)
    index = torch.stack([packed >> 4, packed & 15], dim=-1).flatten().long()
    per_block = (scalers.view(factors.shape[0], -1) / factors.unsqueeze(-1)).flatten().to(values.dtype) + mean
    blocks, per_block = values[index].view(-1, NF4_BLOCK), per_block.unsqueeze(-1)
    return (per_block * blocks if swap else blocks * per_block).view(shape)


def _rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a 2-d tensor scaled so its largest magnitude is 448, in e4m3, and the scales (rows, 1).
    Three passes over ``t`` when run eagerly (a stream, an uncompiled model): its max magnitude, the
    division (in fp32, ``t`` promoted inside the kernel) and the cast. No clamp: a row's largest
    value divides to 448 within fp32 rounding, which e4m3 rounds to 448 (so did the clamp, in a
    fourth pass, after an fp32 copy and abs: six in all). Compiled blocks fuse either into two."""
    amax = torch.linalg.vector_norm(t, float("inf"), dim=-1, keepdim=True)
    scale = amax.float().clamp(min=1e-12) / FP8_MAX
    return (t / scale).to(FP8), scale


# -- the matmuls ---------------------------------------------------------------------------
class _Int8Linear(torch.autograd.Function):
    """x @ dequant(W)^T for int8 weights; backward grad @ dequant(W), dequantized again (the
    frozen weight gets no gradient), so only the quantized weight is kept between the two."""

    @staticmethod
    def forward(ctx, x, qweight, scale):
        ctx.save_for_backward(qweight, scale)
        return F.linear(x, dequantize_scaled(qweight, scale, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        qweight, scale = ctx.saved_tensors
        return grad @ dequantize_scaled(qweight, scale, grad.dtype, swap=True), None, None


class _NF4Linear(torch.autograd.Function):
    """As _Int8Linear, for NF4 weights (``dequantize_nf4``)."""

    @staticmethod
    def forward(ctx, x, packed, scalers, factors, mean, values):
        ctx.save_for_backward(packed, scalers, factors, mean, values)
        shape = (2 * packed.numel() // x.shape[-1], x.shape[-1])
        return F.linear(x, dequantize_nf4(packed, scalers, factors, mean, values, shape).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        packed, scalers, factors, mean, values = ctx.saved_tensors
        shape = (grad.shape[-1], 2 * packed.numel() // grad.shape[-1])
        weight = dequantize_nf4(packed, scalers, factors, mean, values, shape, swap=True)
        return grad @ weight.to(grad.dtype), None, None, None, None, None


class _FP8Linear(torch.autograd.Function):
    """x @ (q * s)^T at FP8 rate: x is quantized per row (e4m3) and multiplied by the e4m3 weight
    with both scales applied in the matmul. Backward: grad @ dequant(W) in the gradient's dtype,
    as _Int8Linear (the frozen weight gets no gradient). An FP8 backward (the gradient scaled to
    e4m3 per row, the weight's transpose laid out for ``_scaled_mm`` on the fly) saved 4% of an
    H100 step's kernel time at GPT-Neo-1.3B's shapes, but put the trainable parameters' gradients
    11-19% (relative norm) off the exact ones after two segments (BENCHMARKS.md, issue 25)."""

    @staticmethod
    def forward(ctx, x, qweight, scale):
        ctx.save_for_backward(qweight, scale)
        rows = x.reshape(-1, x.shape[-1])
        # the bias stays outside: _scaled_mm's own bias failed on an H200 (CUBLAS_STATUS_NOT_SUPPORTED
        # for GPT-Neo's 8,192 -> 2,048 layer, eager, torch 2.11)
        with torch.autocast(x.device.type, enabled=False):  # every dtype here is chosen; autocast would round
            xq, xs = _rowwise_fp8(rows)
            y = torch._scaled_mm(xq, qweight.t(), scale_a=xs, scale_b=scale.t(), out_dtype=torch.bfloat16,
                                 use_fast_accum=True)
        return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        qweight, scale = ctx.saved_tensors
        return grad @ dequantize_scaled(qweight, scale, grad.dtype, swap=True), None, None


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype when autocast is on, as autocast feeds an ``nn.Linear``: the
    autograd functions above compute in their input's dtype, and an fp32 input (a LayerNorm's
    output under autocast) would make the FP8 matmul return fp32, and every activation after it
    (saved for backward too) twice the size of a bf16 layer's."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(device))
    return x


NF4_BUFFERS = ("scalers", "factors", "mean", "values")


class QuantizedLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is held quantized (``format``: "8bit", "4bit", "fp8")
    and dequantized inside each matmul. ``weight`` holds the int8 / e4m3 values (4-bit: the packed
    indices, ``weight.packed_4bit`` set), the rest are buffers (``weight_scale``, ``nf4_*``).
    ``compute_dtype`` is the dtype of its math (peft reads it to place LoRA); ``dequantize()``
    gives the weight as the matmuls see it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, format: str):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full-precision weight
        if format not in FORMATS:
            raise ValueError(f"format={format!r} is not supported; allowed: {FORMATS}")
        self.out_features, self.in_features = weight.shape
        self.format = format
        self.compute_dtype = weight.dtype
        scale, nf4 = None, {}
        if format == "8bit":
            qweight, scale = quantize_int8(weight)
        elif format == "fp8":
            qweight, scale = quantize_fp8(weight)
        else:
            nf4 = quantize_nf4(weight)
            qweight = nf4.pop("packed")
        self.weight = nn.Parameter(qweight, requires_grad=False)
        self.weight.packed_4bit = format == "4bit"  # two weights a byte (adapters.parameter_count)
        # buffers: they move with the layer and are never handed to an optimizer
        self.register_buffer("weight_scale", scale)
        for name in NF4_BUFFERS:
            self.register_buffer(f"nf4_{name}", nf4.get(name))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def _nf4(self) -> list[torch.Tensor]:
        return [getattr(self, f"nf4_{name}") for name in NF4_BUFFERS]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = autocast_input(x)
        if self.format == "8bit":
            y = _Int8Linear.apply(x, self.weight, self.weight_scale)
        elif self.format == "fp8":
            y = _FP8Linear.apply(x, self.weight, self.weight_scale)
        else:
            y = _NF4Linear.apply(x, self.weight, *self._nf4())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def held_weights(self) -> int:
        return self.in_features * self.out_features

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        if self.format == "4bit":
            return dequantize_nf4(self.weight, *self._nf4(), (self.out_features, self.in_features)).to(dtype)
        return dequantize_scaled(self.weight, self.weight_scale, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}, compute_dtype={self.compute_dtype}")


# -- whole models --------------------------------------------------------------------------
def quantizable(shape: tuple[int, int], format: str) -> bool:
    """Whether a weight of ``shape`` (out, in) suits the format: FP8 matmuls need both sides a
    multiple of 16, NF4 whole blocks of 64; layers that do not suit stay in full precision."""
    out_features, in_features = shape
    if format == "fp8":
        return out_features % 16 == 0 and in_features % 16 == 0
    if format == "4bit":
        return nf4_scaler_block(out_features * in_features) is not None
    return True


def quantize_linears(model: nn.Module, format: str, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> int:
    """Replace each linear layer of ``model`` but its LM head by a ``QuantizedLinear`` of
    ``format``, moving each weight to ``device`` first (one layer at a time, so the full-precision
    model never needs to fit there); ``dtype``: the layers' compute dtype (default: the weights').
    GPT-2's Conv1D layers become linear layers, as with bitsandbytes. Returns the number of
    layers replaced; every parameter of ``model`` is frozen."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is head or type(child) not in (nn.Linear, Conv1D):
                continue
            weight = child.weight.detach().t() if isinstance(child, Conv1D) else child.weight.detach()
            if not quantizable(tuple(weight.shape), format):
                continue
            bias = None if child.bias is None else child.bias.detach().to(device, dtype)
            setattr(parent, name, QuantizedLinear(weight.to(device, dtype), bias, format))
            replaced += 1
    model.requires_grad_(False)
    return replaced


def quantized_bytes(model: nn.Module, tables: bool = True) -> tuple[int, int]:
    """(bytes the quantized weights, their scales and NF4 tables take, weights they hold): the
    linear layers and, with ``tables``, the embedding table and LM head that
    ``quantize_embeddings`` holds in int8 (a tied pair counted once)."""
    total = weights = 0
    for layer in model.modules():  # each module once: a tied table is one module under two names
        if isinstance(layer, QuantizedLinear) or (tables and hasattr(layer, "held_weights")):
            weights += layer.held_weights()
            tensors = [layer.weight, *layer.buffers(recurse=False)]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total, weights


def check_fp8(device: torch.device | str) -> None:
    """UserError unless ``device`` is a CUDA GPU with FP8 tensor cores (compute capability >= 8.9:
    Ada, Hopper and later), where e4m3 matmuls run at twice the bf16 rate."""
    device = torch.device(device)
    if device.type != "cuda":
        raise UserError(f"quantization='fp8' needs a GPU with FP8 tensor cores (compute capability >= 8.9); "
                        f"the model would be on {device.type!r}; use quantization='8bit' (also 1 byte per weight)")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise UserError(f"quantization='fp8' needs a GPU with FP8 tensor cores (compute capability >= 8.9: Ada, "
                        f"Hopper or later); {torch.cuda.get_device_name(device)} has {major}.{minor}; use "
                        f"quantization='8bit' (also 1 byte per weight, bf16 matmuls)")
