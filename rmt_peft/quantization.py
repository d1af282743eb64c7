"""bitsandbytes settings for frozen 8-bit and NF4 4-bit backbones."""
from __future__ import annotations

import torch

QUANTIZATIONS = (None, "8bit", "4bit")


def quantization_config(quantization: str | None, compute_dtype: torch.dtype | None = None,
                        quant_type: str = "nf4", double_quant: bool = True, quant_storage: torch.dtype | None = None):
    """A transformers ``BitsAndBytesConfig`` for ``quantization``, or None for full precision."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not supported; allowed: None, '8bit', '4bit'")
    if quantization is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:  # pragma: no cover - bitsandbytes is a dependency
        raise RuntimeError(f"quantization={quantization!r} needs bitsandbytes, which cannot be imported: {err}") from err
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = compute_dtype or torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_storage=quant_storage or torch.uint8)
