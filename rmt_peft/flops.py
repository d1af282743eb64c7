"""Forward FLOPs of full attention vs the Recurrent Memory Transformer (the paper's Figure 2).

The count is the one of Hoffmann et al. (2022, "Chinchilla", Appendix F), per forward pass over
``n`` query positions attending to ``k`` keys (``k = n`` for ordinary self-attention):

    embeddings            2 n V d          (only with count_embeddings, see below)
    per layer:
      Q, K, V projections 2 n d (h + 2 h_kv) d_head   (= 2·3·n·d·(h·d_head) without grouped KV)
      key @ query logits  2 n k (h d_head)
      softmax             3 h n k
      softmax @ values    2 n k (h d_head)
      output projection   2 n (h d_head) d
      MLP                 2 n (m d f)      (m = 2 matrices; 3 for gated MLPs such as Llama's)
    final logits          2 n d V

Full attention reads ``T`` tokens in one pass (n = k = T). RMT reads ``ceil(T / S)`` segments,
each of ``S + 2M`` positions (read memory, segment, write memory), the last one counted as full
(padded), like the paper.

Counting convention that reproduces the paper: the input embedding is a table lookup, not a
matmul, so by default it costs nothing (``count_embeddings=False``); everything else is
Chinchilla's count. At 2,048,000 tokens and 512-token segments this gives OPT-125M 276x / OPT-175B
27.6x with ``--memory-tokens 10`` (10 read + 10 write positions per segment) and 288x / 28.6x
with ``--memory-tokens 0`` (memory not counted, the closest match), against the paper's 295x / 29x.
Counting the embedding as Chinchilla's 2·n·V·d matmul (``--count-embeddings``) gives 214x / 27.5x
(223x / 28.5x without memory): for the small model the vocabulary terms are a large part of the
per-token cost and shrink the ratio beyond the paper's figure.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import Iterable

from .errors import UserError

# model_type values whose MLP has three matrices (gate, up, down) instead of two.
GATED_MLP_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                   "phi3", "olmo", "olmo2", "granite", "cohere", "deepseek_v2", "internlm2")


@dataclass(frozen=True)
class TransformerShape:
    """The sizes the FLOPs count needs. ``head_dim`` defaults to hidden_size / num_heads and
    ``num_kv_heads`` to num_heads (no grouped-query attention)."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_size: int
    head_dim: int | None = None
    num_kv_heads: int | None = None
    mlp_matrices: int = 2

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TransformerShape.{field}={value!r} is invalid: expected an integer >= 1")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"TransformerShape.head_dim is needed: hidden_size={self.hidden_size} is not "
                                 f"divisible by num_heads={self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.mlp_matrices not in (2, 3):
            raise ValueError(f"TransformerShape.mlp_matrices={self.mlp_matrices!r} is invalid: expected 2 "
                             "(up, down) or 3 (gate, up, down)")


def _opt(name: str, hidden: int, layers: int, heads: int) -> TransformerShape:
    # OPT paper (Zhang et al. 2022), Table 1; ffn = 4 x hidden; vocabulary of the released configs.
    return TransformerShape(name, vocab_size=50272, hidden_size=hidden, num_layers=layers, num_heads=heads,
                            ffn_size=4 * hidden)


OPT_FAMILY: dict[str, TransformerShape] = {s.name: s for s in (
    _opt("opt-125m", 768, 12, 12),
    _opt("opt-350m", 1024, 24, 16),
    _opt("opt-1.3b", 2048, 24, 32),
    _opt("opt-2.7b", 2560, 32, 32),
    _opt("opt-6.7b", 4096, 32, 32),
    _opt("opt-13b", 5120, 40, 40),
    _opt("opt-30b", 7168, 48, 56),
    _opt("opt-66b", 9216, 64, 72),
    _opt("opt-175b", 12288, 96, 96),
)}


def shape_from_config(config, name: str | None = None) -> TransformerShape:
    """The shape of a transformers ``PretrainedConfig`` (uses its attribute_map, so GPT-2's
    ``n_embd`` / ``n_layer`` / ``n_head`` are found as hidden_size / num_hidden_layers / ...)."""
    config = getattr(config, "text_config", None) or config
    hidden = config.hidden_size
    ffn = None
    for attr in ("intermediate_size", "ffn_dim", "n_inner", "d_ff"):
        ffn = getattr(config, attr, None)
        if ffn:
            break
    model_type = getattr(config, "model_type", "")
    return TransformerShape(
        name=name or getattr(config, "name_or_path", "") or model_type,
        vocab_size=config.vocab_size,
        hidden_size=hidden,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        ffn_size=ffn or 4 * hidden,  # GPT-2 / GPT-Neo leave it unset: 4 x hidden
        head_dim=getattr(config, "head_dim", None) or None,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or None,
        mlp_matrices=3 if model_type in GATED_MLP_TYPES else 2,
    )


def resolve_shape(model) -> TransformerShape:
    """``model``: a built-in name ("opt-175b", also "facebook/opt-175b"), a TransformerShape, a
    transformers config object, or a path / Hub id whose config.json is loaded."""
    if isinstance(model, TransformerShape):
        return model
    if isinstance(model, str):
        key = model.lower().removeprefix("facebook/")
        if key in OPT_FAMILY:
            return OPT_FAMILY[key]
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(model)
        except (OSError, ValueError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"model={model!r} is neither a built-in config ({', '.join(OPT_FAMILY)}) nor a "
                             f"loadable transformers config: {reason}") from err
        return shape_from_config(config, name=model)
    return shape_from_config(model)


def matmul_params(shape: TransformerShape) -> int:
    """Weights every position multiplies through (2 FLOPs each, forward): per layer the Q, K, V and
    output projections and the MLP, then the LM head. The benchmarks' MFU counts share it."""
    d, h = shape.hidden_size, shape.num_heads
    attn_width = h * shape.head_dim
    qkv = d * shape.head_dim * (h + 2 * shape.num_kv_heads)
    layer = qkv + attn_width * d + shape.mlp_matrices * d * shape.ffn_size
    return shape.num_layers * layer + d * shape.vocab_size


def forward_flops(shape: TransformerShape, seq_len: int, key_len: int | None = None,
                  count_embeddings: bool = False) -> int:
    """Chinchilla forward FLOPs for ``seq_len`` positions attending to ``key_len`` keys."""
    n, k = seq_len, seq_len if key_len is None else key_len
    attn_width = shape.num_heads * shape.head_dim
    logits = 2 * n * k * attn_width
    softmax = 3 * shape.num_heads * n * k
    values = 2 * n * k * attn_width
    embeddings = 2 * n * shape.vocab_size * shape.hidden_size if count_embeddings else 0
    return embeddings + shape.num_layers * (logits + softmax + values) + 2 * n * matmul_params(shape)


@dataclass
class FlopsEstimate:
    model: str
    total_tokens: int
    segment_size: int
    num_memory_tokens: int
    num_segments: int
    full_attention_flops: int
    rmt_flops: int
    ratio: float  # full attention / RMT

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(model, total_tokens: int, segment_size: int = 512, num_memory_tokens: int = 10,
             count_embeddings: bool = False) -> FlopsEstimate:
    """Forward FLOPs of reading ``total_tokens`` with full attention and with RMT."""
    if total_tokens < 1:
        raise ValueError(f"total_tokens={total_tokens} is invalid: expected an integer >= 1")
    if segment_size < 1:
        raise ValueError(f"segment_size={segment_size} is invalid: expected an integer >= 1")
    if num_memory_tokens < 0:
        raise ValueError(f"num_memory_tokens={num_memory_tokens} is invalid: expected an integer >= 0")
    shape = resolve_shape(model)
    segments = math.ceil(total_tokens / segment_size)
    full = forward_flops(shape, total_tokens, count_embeddings=count_embeddings)
    rmt = segments * forward_flops(shape, segment_size + 2 * num_memory_tokens, count_embeddings=count_embeddings)
    return FlopsEstimate(shape.name, total_tokens, segment_size, num_memory_tokens, segments, full, rmt, full / rmt)


def plot_flops(models: Iterable, lengths: list[int], segment_size: int, num_memory_tokens: int, out: str,
               count_embeddings: bool = False) -> str:
    """FLOPs vs input length, log-log: per model, full attention dashed and RMT solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, model in enumerate(models):
        color = f"C{i % 10}"
        points = [estimate(model, t, segment_size, num_memory_tokens, count_embeddings) for t in lengths]
        name = points[0].model
        ax.plot(lengths, [p.full_attention_flops for p in points], "--", color=color, label=f"{name} full attention")
        ax.plot(lengths, [p.rmt_flops for p in points], "-", color=color, label=f"{name} RMT")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("input length, tokens")
    ax.set_ylabel("forward FLOPs")
    ax.set_title(f"RMT (segment {segment_size}, memory {num_memory_tokens}) vs full attention")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_lengths(segment_size: int, total_tokens: int) -> list[int]:
    """Powers of two from one segment up to ``total_tokens`` (included)."""
    lengths, t = [], segment_size
    while t < total_tokens:
        lengths.append(t)
        t *= 2
    return lengths + [total_tokens]


def run(args: argparse.Namespace) -> int:
    try:
        result = estimate(args.model, args.total_tokens, args.segment_size, args.memory_tokens, args.count_embeddings)
    except ValueError as err:  # a model that cannot be read (offline, a typo), a count <= 0
        raise UserError(str(err)) from err
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"{result.model}: {result.total_tokens:,} tokens, {result.num_segments:,} segments of "
              f"{result.segment_size} (+2x{result.num_memory_tokens} memory positions)")
        print(f"  full attention  {result.full_attention_flops:.3e} FLOPs")
        print(f"  RMT             {result.rmt_flops:.3e} FLOPs")
        print(f"  ratio           {result.ratio:.1f}x fewer with RMT")
    if args.plot:
        models = [m for m in (args.models or args.model).split(",") if m]
        plot_flops(models, plot_lengths(args.segment_size, args.total_tokens), args.segment_size,
                   args.memory_tokens, args.plot, args.count_embeddings)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("flops", help="forward FLOPs of full attention vs RMT (Chinchilla count)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-175b",
                   help=f"built-in ({', '.join(OPT_FAMILY)}) or a transformers config path / Hub id")
    p.add_argument("--total-tokens", type=int, default=2_048_000, help="input length T")
    p.add_argument("--segment-size", type=int, default=512, help="input tokens per RMT segment S")
    p.add_argument("--memory-tokens", type=int, default=10,
                   help="memory tokens M; each segment has S + 2M positions (read and write memory)")
    p.add_argument("--count-embeddings", action="store_true",
                   help="count the input embedding as a 2·n·V·d matmul (Chinchilla's literal count)")
    p.add_argument("--json", action="store_true",
                   help="print {full_attention_flops, rmt_flops, ratio, ...} as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="also plot FLOPs vs length (log-log)")
    p.add_argument("--models", help="comma-separated models for --plot (default: --model)")
    p.set_defaults(func=run)
