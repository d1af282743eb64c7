"""Tiny random models built from configs: offline stand-ins for the real backbones.

Used by the quickstart, the tests and the benchmarks (at full size, from the real configs'
shapes), so nothing is downloaded. Hidden sizes default to 64, which bitsandbytes' CPU 4-bit
path needs (multiples of 64).
"""
from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoConfig, GPTNeoXConfig, LlamaConfig,
                          OPTConfig, PretrainedConfig)

ARCHITECTURES = ("gpt_neo", "gpt2", "opt", "llama", "gpt_neox")
TINY_PREFIX = "tiny:"  # a recipe's model.name_or_path "tiny:<arch>": built from a config, no checkpoint


def tiny_config(architecture: str = "gpt_neo", vocab_size: int = 128, hidden_size: int = 64,
                num_layers: int = 2, num_heads: int = 4, max_positions: int = 128) -> PretrainedConfig:
    """A small config of ``architecture`` (one of ARCHITECTURES)."""
    if architecture == "gpt_neo":
        return GPTNeoConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                            num_heads=num_heads, attention_types=[[["global", "local"], num_layers // 2]]
                            if num_layers % 2 == 0 else [[["global"], num_layers]],
                            max_position_embeddings=max_positions, window_size=32,
                            intermediate_size=4 * hidden_size, bos_token_id=0, eos_token_id=1)
    if architecture == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                          n_positions=max_positions, bos_token_id=0, eos_token_id=1)
    if architecture == "opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, ffn_dim=4 * hidden_size, word_embed_proj_dim=hidden_size,
                         max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if architecture == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
                           intermediate_size=2 * hidden_size, max_position_embeddings=max_positions,
                           bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    if architecture == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=num_heads, intermediate_size=4 * hidden_size,
                             max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=1)
    raise ValueError(f"architecture={architecture!r} is not known; allowed: {ARCHITECTURES}")


def tiny_model(architecture: str = "gpt_neo", seed: int = 0, **config_kwargs):
    """A randomly initialised causal LM of ``architecture``, in fp32 eval mode."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(architecture, **config_kwargs)).eval()


def save_tiny_model(path: str, architecture: str = "gpt_neo", seed: int = 0, **config_kwargs) -> str:
    """Build a tiny model and save it to ``path`` so it loads like a Hub checkpoint."""
    tiny_model(architecture, seed, **config_kwargs).save_pretrained(path)
    return path
