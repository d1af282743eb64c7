"""Loading backbones and knowing their limits.

``load_backbone`` returns a plain Hugging Face causal LM (bf16/fp32, or frozen 8-bit / 4-bit / FP8
through bitsandbytes or torch, see ``quantization``; prepared for training deliberately: non-reentrant checkpointing, no fp32
upcasts). ``check_position_limit`` enforces that a segment with its memory fits
the position table of models with learned absolute positions (GPT-2, GPT-Neo, OPT).
"""
from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .attention import use_gpt_neo_sdpa
from .quantization import backend_for, check_bitsandbytes, quantization_config, single_device, target_device
from .quantized_embedding import quantize_embeddings as quantize_tables
from .quantized_linear import check_fp8, quantize_linears
from .speedups import use_fused_gelu

logger = logging.getLogger("rmt_peft")

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
    needed = memory_config.positions_per_segment
    if used is None and needed > limit:
        memory = "memory" if memory_config.associative else "2 x memory"
        raise ValueError(
            f"segment_size={s} with num_memory_tokens={m} needs {needed} positions "
            f"(segment + {memory}) but {config.model_type} has a learned position table of {limit}; "
            f"use segment_size <= {limit - (needed - s)} or fewer memory tokens")
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
                  device_map=None, attn_implementation: str | None = None, *,
                  quant_type: str = "nf4", double_quant: bool = True,
                  compute_dtype: str | torch.dtype | None = None, quant_storage: str | torch.dtype | None = None,
                  quantization_backend: str = "auto", quantize_embeddings: bool = True,
                  gradient_checkpointing: bool = False, train: bool = False, speedups: bool = True, **kwargs) -> PreTrainedModel:
    """Load a causal LM (GPT-Neo, OPT, GPT-2, GPT-NeoX/Pythia, Llama-style...) from the Hub or a folder.

    quantization: None, "8bit", "4bit" or "fp8" (e4m3, CUDA GPUs with FP8 tensor cores only); the
    quantized model is frozen (every parameter ``requires_grad=False``).
    quantization_backend: which library holds the weights (``quantization.choose_backend``).
    "bitsandbytes": LLM.int8 / NF4 as in the paper, the linear layers replaced while loading.
    "torch": ``rmt_peft.quantized_linear`` (int8 per channel, torchao's NF4, FP8): the model is
    loaded on the CPU and each linear layer is moved to the device and quantized there, one at a
    time; each matmul dequantizes its weight (compiled blocks fuse it), so no
    bf16 copy is kept. "auto" (default): torch on a CUDA GPU, bitsandbytes elsewhere (logged).
    quantize_embeddings (torch backend): the embeddings and LM head in int8 too, one scale a row, a
    tied head sharing the table (``rmt_peft.quantized_embedding``); False keeps them in ``dtype``.
    4-bit options: ``quant_type`` "nf4" / "fp4", ``double_quant``, ``compute_dtype`` (default:
    ``dtype``, else bfloat16), ``quant_storage`` (set it to the compute dtype for FSDP / ZeRO-3);
    all but compute_dtype are bitsandbytes' (other values than the defaults select it). Before
    loading, bitsandbytes is tried on the target device; where it cannot run a RuntimeError names
    the quantization and the device.
    dtype: dtype of the weights that stay unquantized ("bfloat16", "float32", ...).
    attn_implementation: as in transformers; "sdpa" for GPT-Neo (which transformers runs eager
    only) selects our exact SDPA attention (``rmt_peft.attention``): same outputs, less memory.
    speedups: True (default) applies the exact speed-ups of ``rmt_peft.speedups``: GPT-Neo gets
    the SDPA attention unless ``attn_implementation`` names another, and GPT-Neo / GPT-2 the
    one-kernel GELU. False loads the model exactly as transformers builds it.

    Training preparation is deliberate, not ``peft.prepare_model_for_kbit_training``:
    - ``gradient_checkpointing=True`` enables the model's per-layer activation checkpointing,
      non-reentrant (``use_reentrant=False``): the same LoRA weights are used in every segment
      of the recurrence, which reentrant checkpointing handles badly (gradient hooks fired once
      per use under DeepSpeed, and it needs inputs that require grad). Non-reentrant needs no
      ``enable_input_require_grads`` hook, so that hook is removed again. It duplicates
      ``MemoryConfig.checkpoint_segments`` (segment-level recompute): use one of the two.
    - ``train=True`` returns the model in train mode (``from_pretrained`` returns eval mode,
      where transformers silently skips checkpointing); gradient_checkpointing implies it.
    - No fp32 upcast of embeddings, norms or lm_head: they are frozen, so fp32 copies only cost
      memory (for GPT-Neo-1.3B the 50k x 2048 embedding and lm_head alone are 0.4 GB in fp32)
      while bf16 norms already accumulate in fp32 inside the kernels. The trainable parameters
      (LoRA, memory) are created in fp32 by peft and ``MemoryParameters``.
    """
    if os.path.sep in name_or_path and not os.path.exists(name_or_path) and name_or_path.startswith((".", "/")):
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    torch_dtype = resolve_dtype(dtype)
    load_kwargs = dict(kwargs)
    if torch_dtype is not None:
        load_kwargs["dtype"] = torch_dtype
    gpt_neo_sdpa = _set_attention(load_kwargs, name_or_path, attn_implementation, speedups)
    device = single_device(device_map)
    backend = backend_for(quantization, quantization_backend, device, quant_type, double_quant, quant_storage)
    compute = resolve_dtype(compute_dtype) or torch_dtype or torch.bfloat16
    if backend == "torch":
        if quantization == "fp8":
            check_fp8(device)
        load_kwargs["dtype"] = torch_dtype or compute  # on the CPU; quantized onto the device below
    else:
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        qconfig = quantization_config(quantization, resolve_dtype(compute_dtype) or torch_dtype, quant_type,
                                      double_quant, resolve_dtype(quant_storage))
        if qconfig is not None:
            check_bitsandbytes(quantization, target_device(device_map), quant_type)
            load_kwargs["quantization_config"] = qconfig
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **load_kwargs)
    if backend == "torch":
        _hold_quantized(model, quantization, device, compute, quantize_embeddings)
    if gpt_neo_sdpa:
        use_gpt_neo_sdpa(model)
    if speedups:
        use_fused_gelu(model)
    if backend is not None:
        model.requires_grad_(False)
    if gradient_checkpointing:
        enable_checkpointing(model)
    if train or gradient_checkpointing:
        model.train()
    return model


def _hold_quantized(model: PreTrainedModel, quantization: str, device, compute: torch.dtype, tables: bool) -> None:
    """The torch backend: each linear layer (and with ``tables`` the embeddings and LM head)
    moved to ``device`` and quantized there, one at a time, then the rest of the model."""
    quantize_linears(model, quantization, device, dtype=compute)
    if tables:
        quantize_tables(model, device, dtype=compute)
    model.to(device)


def _set_attention(load_kwargs: dict, name_or_path: str, attn_implementation: str | None, speedups: bool) -> bool:
    """Put the attention transformers loads with in ``load_kwargs``; True when GPT-Neo then switches
    to our exact SDPA (transformers has none for GPT-Neo: it loads eager and switches, attention.py)."""
    wants_sdpa = attn_implementation in ("sdpa", "gpt_neo_sdpa") or (speedups and attn_implementation is None)
    hub_kwargs = {k: load_kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only",
                                              "trust_remote_code")
                  if k in load_kwargs}  # reading the config needs what loading the model needs
    gpt_neo_sdpa = wants_sdpa and AutoConfig.from_pretrained(name_or_path, **hub_kwargs).model_type == "gpt_neo"
    if gpt_neo_sdpa:
        attn_implementation = "eager"
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    return gpt_neo_sdpa


def enable_checkpointing(model: PreTrainedModel, *, zero3: bool = False, drop_input_hook: bool = True) -> None:
    """Non-reentrant per-layer activation checkpointing (see ``load_backbone``).

    zero3: under ZeRO-3 the recompute sees the frozen weights re-partitioned (shape [0]) until
    DeepSpeed's pre-backward hook gathers them again for the gradient, so torch's metadata check
    (not the gradients) would fail: it is turned off (DeepSpeed #8148 / transformers #47254).
    drop_input_hook: remove the input-requires-grad hook that transformers adds for reentrant
    checkpointing (``load_backbone`` does; the training engine has always kept it).
    """
    kwargs = {"use_reentrant": False}
    if zero3:
        kwargs["determinism_check"] = "none"
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5.x naming
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if drop_input_hook:
        model.disable_input_require_grads()


def uses_non_reentrant_checkpointing(model: nn.Module) -> bool:
    """True when the model's layers are checkpointed with ``use_reentrant=False``."""
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and func is not None:
            return getattr(func, "keywords", {}).get("use_reentrant") is False
    return False
