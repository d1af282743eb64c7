"""An exact SDPA attention path for GPT-Neo, registered through transformers' attention interface.

transformers ships GPT-Neo with eager attention only (plus flash-attn 2, which needs an extra
package): scores in fp32, no 1/sqrt(head_dim) scaling, and a 256-token sliding window on the
"local" layers. Eager materialises (batch, heads, q, k) fp32 scores and probabilities in every
layer, which dominates activation memory and time at 1-2k-token segments. This module computes
the same function with ``torch.nn.functional.scaled_dot_product_attention``:

- ``scale=1.0`` (GPT-Neo does not scale scores);
- SDPA's fused kernels accumulate q.k in fp32 and run the softmax in fp32, which is what eager's
  upcast buys, without storing fp32 score matrices;
- local layers AND the model's own sliding-window buffer (``module.bias``) into the mask, so the
  window is exactly eager's;
- with no padding a global layer runs ``is_causal=True`` (the flash kernel), also where
  transformers cannot rule out packed sequences (compiling, CUDA-graph capture) and would build a
  full mask, for callers that say they never pack (``unpacked_rows``: ``RMTModel``).

``use_gpt_neo_sdpa(model)`` switches a loaded GPT-Neo model (plain, quantized or inside peft) to
it: the attention function and its mask builder are registered as ``"gpt_neo_sdpa"`` in
``AttentionInterface`` / ``AttentionMaskInterface``, the config names that implementation (so
``create_causal_mask`` builds boolean SDPA masks, or none), and each eager self-attention module
gets a subclass whose ``_attn`` dispatches through the interface. Weights and state dicts are
unchanged. Attention weights are not returned (``output_attentions`` needs eager).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

GPT_NEO_SDPA = "gpt_neo_sdpa"


def gpt_neo_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float = 1.0,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of one GPT-Neo layer. query/key/value: (batch, heads, q/k, head_dim);
    attention_mask: a boolean (batch, 1, q, k) SDPA mask (True = attend) or None (causal, no
    padding). Returns ((batch, q, heads, head_dim), None), the interface's layout."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    # The model's own causal(+window) table, aligned bottom-right as eager slices it.
    table = module.bias[:, :, k_len - q_len:k_len, :k_len]
    mask, is_causal = attention_mask, False
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"{GPT_NEO_SDPA} expects a boolean attention mask, got {mask.dtype}; "
                        "switch the model with use_gpt_neo_sdpa()")
    if module.attention_type == "local":
        mask = table if mask is None else mask & table
    elif mask is None:
        if q_len == k_len:
            is_causal = True
        else:
            mask = table
    if mask is not None and attention_mask is not None:
        # A query that sees no key (padding far inside a local window) would give NaN, and NaN
        # values leak into real rows through 0 * NaN in probs @ values; let such rows see themselves.
        # Real tokens always attend to themselves, so their rows do not change.
        rows = torch.arange(k_len - q_len, k_len, device=mask.device)
        mask = mask | (rows[:, None] == torch.arange(k_len, device=mask.device))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                         is_causal=is_causal, scale=scaling)
    return out.transpose(1, 2), None


_unpacked = 0  # > 0 inside unpacked_rows()


@contextmanager
def unpacked_rows():
    """Inside it, a GPT-Neo SDPA call without a padding mask builds no mask: each row is one sequence.

    Without a padding mask transformers checks the position ids for packed sequences (a host sync).
    Where it cannot read them, while compiling or capturing a CUDA graph, it assumes packing and
    builds a full (batch, 1, q, k) mask: every global layer then runs masked SDPA instead of the
    causal kernel, and compiled blocks see a mask in the capture that they never saw eagerly, so
    they compile again inside it, which the capture refuses (measured on an H100, BENCHMARKS.md).
    Callers that never pack (``RMTModel``, whose positions count from 0 in every row) say so here.
    """
    global _unpacked
    _unpacked += 1
    try:
        yield
    finally:
        _unpacked -= 1


def gpt_neo_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """transformers' ``sdpa_mask``, except that inside ``unpacked_rows`` no padding means no mask."""
    if attention_mask is None and _unpacked:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(GPT_NEO_SDPA, gpt_neo_sdpa_attention)
AttentionMaskInterface.register(GPT_NEO_SDPA, gpt_neo_sdpa_mask)


class GPTNeoSdpaSelfAttention(GPTNeoSelfAttention):
    """GPT-Neo self-attention whose score/softmax/value step runs through the attention interface."""

    def _attn(self, query, key, value, attention_mask=None):
        attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        dropout = self.attn_dropout.p if self.training else 0.0
        out, weights = attention(self, query, key, value, attention_mask, dropout=dropout, scaling=1.0)
        return out.transpose(1, 2), weights  # back to eager's (batch, heads, q, head_dim)


def use_gpt_neo_sdpa(model: nn.Module, enable: bool = True) -> int:
    """Switch every GPT-Neo eager self-attention inside ``model`` to the exact SDPA path
    (``enable=False`` switches back to eager, e.g. for ``output_attentions``).

    Either way the layers of one attention type then share one causal(+window) table: transformers
    gives each layer its own (max_positions^2 booleans, 4 MiB; 100 MiB over GPT-Neo-1.3B's 24
    layers), all equal.

    Returns the number of layers switched (0 if there is nothing to switch). Idempotent.
    """
    source, target = (GPTNeoSelfAttention, GPTNeoSdpaSelfAttention) if enable else \
        (GPTNeoSdpaSelfAttention, GPTNeoSelfAttention)
    switched, configs, tables = 0, {}, {}
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target
            switched += 1
            configs[id(module.config)] = module.config
        if isinstance(module, GPTNeoSelfAttention):
            table = module.bias
            shared = tables.setdefault((module.attention_type, table.shape, table.device), table)
            if shared is not table and torch.equal(shared, table):
                module.register_buffer("bias", shared, persistent=False)
    for config in configs.values():
        # Only the mask builder and the dispatch above read this name; eager modules were replaced.
        config._attn_implementation = GPT_NEO_SDPA if enable else "eager"
    return switched
