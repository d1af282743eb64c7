"""Loading backbones and knowing their limits.

``load_backbone`` returns a plain Hugging Face causal LM (bf16/fp32, or frozen 8-bit / NF4 4-bit
through bitsandbytes). ``check_position_limit`` enforces that a segment with its memory fits
the position table of models with learned absolute positions (GPT-2, GPT-Neo, OPT).
"""
from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

# model_type -> config attribute holding the size of a learned absolute position table
LEARNED_POSITION_LIMITS = {
    "gpt2": "n_positions",
    "gpt_neo": "max_position_embeddings",
    "opt": "max_position_embeddings",
    "biogpt": "max_position_embeddings",
    "xglm": "max_position_embeddings",
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def causal_lm_of(model: nn.Module) -> PreTrainedModel:
    """The transformers causal LM inside ``model`` (itself, or the one a peft model wraps)."""
    get_base = getattr(model, "get_base_model", None)
    inner = get_base() if callable(get_base) else model
    if not isinstance(inner, PreTrainedModel) or inner.get_output_embeddings() is None:
        raise TypeError(f"expected a transformers causal LM (…ForCausalLM), got {type(inner).__name__}")
    return inner


def position_limit(config: PretrainedConfig) -> int | None:
    """Size of the learned absolute position table, or None for RoPE / ALiBi models."""
    attr = LEARNED_POSITION_LIMITS.get(config.model_type)
    return getattr(config, attr, None) if attr else None


def check_position_limit(config: PretrainedConfig, memory_config, extra: int = 0, used: int | None = None) -> None:
    """Raise ValueError when a segment plus memory (plus ``extra`` generated tokens) does not fit."""
    limit = position_limit(config)
    if limit is None:
        return
    m, s = memory_config.num_memory_tokens, memory_config.segment_size
    if used is None and s + 2 * m > limit:
        raise ValueError(
            f"segment_size={s} with num_memory_tokens={m} needs {s + 2 * m} positions "
            f"(segment + 2 x memory) but {config.model_type} has a learned position table of {limit}; "
            f"use segment_size <= {limit - 2 * m} or fewer memory tokens")
    if used is not None and used + extra > limit:
        raise ValueError(
            f"generating {extra} tokens after {used} positions (memory + last segment) exceeds the "
            f"{limit} positions of {config.model_type}; lower max_new_tokens to <= {limit - used}")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_backbone(name_or_path: str, quantization: str | None = None, dtype: str | torch.dtype | None = None,
                  device_map=None, attn_implementation: str | None = None, **kwargs) -> PreTrainedModel:
    """Load a causal LM from the Hub or a local folder.

    quantization: None, "8bit" (LLM.int8) or "4bit" (NF4, double quantization) via bitsandbytes;
    the quantized weights are frozen. dtype: compute / weight dtype ("bfloat16", "float32", ...).
    """
    from .quantization import quantization_config

    if os.path.sep in name_or_path and not os.path.exists(name_or_path) and name_or_path.startswith((".", "/")):
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    torch_dtype = resolve_dtype(dtype)
    load_kwargs = dict(kwargs)
    if torch_dtype is not None:
        load_kwargs["dtype"] = torch_dtype
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    qconfig = quantization_config(quantization, torch_dtype)
    if qconfig is not None:
        load_kwargs["quantization_config"] = qconfig
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **load_kwargs)
    if qconfig is not None:
        for p in model.parameters():
            p.requires_grad_(False)
    return model
