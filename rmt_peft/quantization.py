"""bitsandbytes settings for frozen 8-bit (LLM.int8) and 4-bit (NF4 / FP4) backbones.

``quantization_config`` builds the transformers ``BitsAndBytesConfig``; ``check_bitsandbytes``
runs one tiny quantize / dequantize on the target device first, so a machine where
bitsandbytes cannot run (no native library for the device, no supported device) fails with a
message naming the quantization, the device and the cause instead of deep inside loading.
"""
from __future__ import annotations

import functools

import torch

QUANTIZATIONS = (None, "8bit", "4bit")
QUANT_TYPES = ("nf4", "fp4")


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
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not supported; allowed: None, '8bit', '4bit'")
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
