"""Building what a recipe trains: the backbone (loaded, or a tiny one built from a config), the
RMTModel around it with LoRA, the memory and the speed-ups the recipe asks for, and the tokenizer.
Under ZeRO-3 the model is built once the first TrainingArguments exist (they make transformers
partition the backbone while it loads); the curriculum run (trainer.py) calls these then.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from ..attention import use_gpt_neo_sdpa
from ..backbones import DTYPES, enable_checkpointing, load_backbone
from ..errors import UserError
from ..loading import load_tokenizer, tokenizer_name
from ..log import logger
from ..quantized_embedding import embedding_matrix
from ..recipe import TINY_PREFIX, ZERO3_NO_COMPILE, Recipe, needs_tokenizer
from ..recurrent import RMTModel
from ..tiny_models import tiny_model
from .engine import gathered


def build_tokenizer(recipe: Recipe):
    """The recipe's tokenizer (``runs.tokenizer_name``), or None for token-level tasks on tiny models."""
    if recipe.model.tokenizer is None and recipe.model.is_tiny and not needs_tokenizer(recipe):
        return None
    name = tokenizer_name(recipe)
    with not_found_is_user_error("model.tokenizer", name):
        return load_tokenizer(name)


@contextlib.contextmanager
def not_found_is_user_error(key: str, name: str):
    """A model or tokenizer that cannot be found (a typo, or a Hub id not cached while offline)
    is a mistake in the recipe: one line naming the key, not a traceback."""
    try:
        yield
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = " (offline: HF_HUB_OFFLINE is set and it is not in the cache)" if os.environ.get(
            "HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise UserError(f"{key}={name!r} could not be loaded{offline}: {reason}") from err


def embedding_std(causal_lm) -> float:
    """Std of the input embedding matrix, computed on the whole matrix even under ZeRO-3."""
    embeddings = causal_lm.get_input_embeddings()
    with gathered(list(embeddings.parameters())):
        return float(embedding_matrix(embeddings).detach().float().std())


def build_backbone(recipe: Recipe, seed: int):
    model = recipe.model
    if model.is_tiny:  # built in fp32 from a config, then in model.dtype (a quantization is refused by the recipe)
        backbone = tiny_model(model.name_or_path[len(TINY_PREFIX):], seed=seed, **model.config)
        return backbone.to(DTYPES[model.dtype]) if model.dtype else backbone
    kwargs = {"quantization_backend": model.quantization_backend, "quantize_embeddings": model.quantize_embeddings}
    if model.quantization == "4bit" and recipe.zero_stage == 3:
        kwargs["quant_storage"] = model.dtype  # ZeRO-3 partitions 4-bit storage only in the compute dtype
    if model.quantization_backend == "auto" and model.quantization in ("8bit", "4bit") and (
            recipe.deepspeed_config is not None or model.cache_dequantized_weights):
        # DeepSpeed broadcasts and partitions plain parameters, and the cache copies bitsandbytes' layers
        kwargs["quantization_backend"] = "bitsandbytes"
    with not_found_is_user_error("model.name_or_path", model.name_or_path):
        return load_backbone(model.name_or_path, quantization=model.quantization, dtype=model.dtype,
                             attn_implementation=model.attention, speedups=model.speedups, **kwargs)


def build_model(recipe: Recipe, seed: int):
    """Backbone (+ LoRA) wrapped in an RMTModel, in training mode."""
    backbone = build_backbone(recipe, seed)
    memory = recipe.memory
    if memory.memory_init_std is None and memory.num_memory_tokens:
        # RMTModel would take the std of a ZeRO-3 partition (an empty tensor): gather it here.
        memory = dataclasses.replace(memory, memory_init_std=embedding_std(backbone))
    torch.manual_seed(seed)
    # lora null: full fine-tuning (small models); quantized backbones arrive frozen either way.
    compile = (recipe.model.compile_mode or True) if recipe.compiles_blocks else False
    if recipe.model.compile_blocks is None and recipe.zero_stage == 3 and torch.cuda.is_available():
        logger.info(f"model.compile_blocks: null resolves to off under ZeRO-3 (training.deepspeed): {ZERO3_NO_COMPILE}")
    half = recipe.model.dtype is not None and DTYPES[recipe.model.dtype] in (torch.bfloat16, torch.float16)
    if recipe.zero_stage == 3 and half and recipe.model.quantization is None and not recipe.keys.half_precision:
        logger.warning(f"model.dtype={recipe.model.dtype} under ZeRO-3 without training.bf16 (or fp16): transformers "
                       f"partitions the backbone in the DeepSpeed config's dtype, fp32 here, so it is held and "
                       f"computed in fp32 (twice the memory, fp32 matmuls); set training.bf16=true")
    # null: on where it costs little (RMTModel.from_backbone); never under ZeRO-3 (partitioned weights)
    cache = False if recipe.zero_stage == 3 else recipe.model.cache_dequantized_weights
    rmt = RMTModel.from_backbone(backbone, memory, lora=recipe.lora, speedups=recipe.model.speedups,
                                 compile=compile, compile_scope=recipe.model.compile_scope,
                                 compile_memory_budget=recipe.model.compile_memory_budget, cache_dequantized=cache,
                                 verbose=False)
    logger.info(rmt.trainable_summary())
    if recipe.model.attention == "eager":  # asked for by name: keep it (from_backbone switches GPT-Neo to SDPA)
        use_gpt_neo_sdpa(rmt.causal_lm, enable=False)
    if recipe.keys.checkpointing:
        # Non-reentrant only: BPTT reuses the LoRA weights in every segment.
        enable_checkpointing(rmt.causal_lm, zero3=recipe.zero_stage == 3, drop_input_hook=False)
    return rmt.train()

