"""How a frozen backbone is quantized: which library holds the weights, and bitsandbytes' settings.

Two backends: "bitsandbytes" (LLM.int8 for 8-bit, NF4 / FP4 for 4-bit: the paper's setup and
peft's k-bit path) and "torch" (``rmt_peft.quantized_linear``: int8 per channel, torchao's NF4,
or FP8 e4m3, dequantized inside each matmul, so compiled blocks train at close to bf16 speed
without bf16 copies). ``choose_backend`` resolves "auto": torch on a CUDA GPU, bitsandbytes
elsewhere or where only bitsandbytes has the options asked for.

``quantization_config`` builds the transformers ``BitsAndBytesConfig``; ``check_bitsandbytes``
runs one tiny quantize / dequantize on the target device first, so a machine where
bitsandbytes cannot run (no native library for the device, no supported device) fails with a
message naming the quantization, the device and the cause instead of deep inside loading.
"""
from __future__ import annotations

import functools

import torch

from .errors import UserError
from .log import logger
from .quantized_linear import torchao_available

QUANTIZATIONS = (None, "8bit", "4bit", "fp8")
BACKENDS = ("auto", "bitsandbytes", "torch")
QUANT_TYPES = ("nf4", "fp4")


def choose_backend(quantization: str | None, backend: str, device_type: str, bnb_options: tuple[str, ...] = (),
                   torchao: bool | None = None) -> tuple[str | None, str | None]:
    """The backend that holds ``quantization``'s weights, and why (for the log; None when there
    was no choice). ``device_type``: where the weights go ("cuda", "cpu", ...; "multi" for a
    device map over several devices); ``bnb_options``: options given that only bitsandbytes has
    (e.g. "quant_type='fp4'"); ``torchao``: whether torchao imports (None: look).

    "auto" picks "torch" on a CUDA GPU: bitsandbytes dequantizes through Python on every call,
    which leaves RMT training CPU-bound (8-bit 6.8x slower than NF4 with bf16 copies,
    BENCHMARKS.md); elsewhere it keeps bitsandbytes, as before (its CPU path is what CI tests)."""
    if backend not in BACKENDS:
        raise UserError(f"quantization_backend={backend!r} is not supported; allowed: {list(BACKENDS)}")
    if quantization not in QUANTIZATIONS:
        raise UserError(f"quantization={quantization!r} is not supported; allowed: {list(QUANTIZATIONS)}")
    if quantization is None:
        return None, None
    if quantization == "fp8":
        if backend == "bitsandbytes":
            raise UserError("quantization='fp8' is held by torch (torch._scaled_mm), not bitsandbytes; use "
                            "quantization_backend='auto' or 'torch'")
        return "torch", None
    if backend == "torch":
        if bnb_options:
            raise UserError(f"{', '.join(bnb_options)} exist(s) only in bitsandbytes; use "
                            f"quantization_backend='bitsandbytes', or leave the option at its default")
        if device_type == "multi":
            raise UserError("quantization_backend='torch' holds the whole model on one device; use a device_map "
                            "with one device, or quantization_backend='bitsandbytes'")
        return "torch", None
    if backend == "bitsandbytes":
        return "bitsandbytes", None
    if bnb_options:
        return "bitsandbytes", f"bitsandbytes: {', '.join(bnb_options)} exist(s) only there"
    if device_type != "cuda":
        return "bitsandbytes", f"bitsandbytes: the weights go to {device_type!r}, not a CUDA GPU"
    if quantization == "4bit" and not (torchao_available() if torchao is None else torchao):
        return "bitsandbytes", "bitsandbytes: torch's NF4 needs torchao, which is not installed"
    return "torch", ("torch: weights stay quantized on the GPU and each (compiled) matmul dequantizes them, "
                     "instead of bitsandbytes' per-call dequantization through Python")


def backend_for(quantization: str | None, asked: str, device: torch.device | None, quant_type: str = "nf4",
                double_quant: bool = True, quant_storage=None) -> str | None:
    """``choose_backend`` for weights loaded onto ``device`` (None: a device map over several) with
    these 4-bit options (those other than the defaults exist in bitsandbytes only); the choice is
    logged when there was one to make."""
    bnb_options = tuple(f"{name}={value!r}" for name, value, default in
                        (("quant_type", quant_type, "nf4"), ("double_quant", double_quant, True),
                         ("quant_storage", quant_storage, None)) if value != default) if quantization == "4bit" else ()
    backend, why = choose_backend(quantization, asked, "multi" if device is None else device.type, bnb_options)
    if why:
        logger.info(f"quantization={quantization!r} held by {why}; load_backbone(quantization_backend=...) "
                    f"(recipes: model.quantization_backend) overrides")
    return backend


def quantization_config(quantization: str | None, compute_dtype: torch.dtype | None = None,
                        quant_type: str = "nf4", double_quant: bool = True,
                        quant_storage: torch.dtype | None = None, int8_threshold: float = 6.0):
    """A transformers ``BitsAndBytesConfig`` for ``quantization``, or None for full precision.

    4-bit: ``quant_type`` "nf4" (QLoRA's normal float) or "fp4"; ``double_quant`` also quantizes
    the per-block scales (~0.4 bit per weight saved); ``compute_dtype`` is the dtype the
    dequantized weights are multiplied in (default bfloat16); ``quant_storage`` is the dtype the
    packed weights are stored as (default uint8; set it to the compute dtype for FSDP / ZeRO-3,
    which shard all parameters of one dtype together). 8-bit: ``int8_threshold`` is LLM.int8's
    outlier threshold (features above it are computed in fp16).
    """
    if quantization not in (None, "8bit", "4bit"):
        raise ValueError(f"quantization={quantization!r} is not supported by bitsandbytes; allowed: None, '8bit', "
                         f"'4bit'")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; allowed: {QUANT_TYPES}")
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=int8_threshold)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
                              bnb_4bit_quant_storage=quant_storage or torch.uint8)


def target_device(device_map) -> str:
    """The device type the quantized weights will live on for a transformers ``device_map``."""
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if device_map is None or device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return accelerator
    if isinstance(device_map, dict):
        placed = [v for v in device_map.values() if v not in ("cpu", "disk")]
        device_map = placed[0] if placed else "cpu"
    if isinstance(device_map, int):
        return accelerator
    return torch.device(device_map).type


def single_device(device_map) -> torch.device | None:
    """The one device a transformers ``device_map`` puts the model on (None: several)."""
    if device_map is None or device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, dict):
        placed = set(device_map.values())
        if len(placed) != 1:
            return None
        device_map = placed.pop()
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    device = torch.device(device_map)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None \
        else device


@functools.lru_cache(maxsize=None)
def check_bitsandbytes(quantization: str, device: str, quant_type: str = "nf4") -> None:
    """Raise RuntimeError when bitsandbytes cannot run ``quantization`` on ``device`` (a type)."""
    try:
        import bitsandbytes as bnb
    except Exception as err:  # ImportError, or a broken native library raising at import
        raise RuntimeError(f"quantization={quantization!r} needs bitsandbytes, which cannot be imported "
                           f"here ({err}); install bitsandbytes or use quantization=None") from err
    supported = getattr(bnb, "supported_torch_devices", None)
    if supported is not None and device not in supported:
        raise RuntimeError(f"quantization={quantization!r} is requested on device {device!r}, which "
                           f"bitsandbytes {bnb.__version__} does not support (supported: {sorted(supported)}); "
                           f"use quantization=None (bf16) or another device_map")
    try:
        weight = torch.randn(64, 64, device=device)
        if quantization == "4bit":
            packed, state = bnb.functional.quantize_4bit(weight, quant_type=quant_type)
            bnb.functional.dequantize_4bit(packed, state)
        else:
            bnb.functional.int8_vectorwise_quant(weight.half())
    except Exception as err:
        raise RuntimeError(f"quantization={quantization!r}: bitsandbytes {bnb.__version__} cannot run on "
                           f"device {device!r} ({type(err).__name__}: {err}); use quantization=None (bf16) "
                           f"or a device bitsandbytes supports") from err
