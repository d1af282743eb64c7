"""The token embeddings and the LM head of a torch-held quantized backbone, in int8 (one scale a row).

``quantize_linears`` quantizes the linear layers; left in bf16, the vocabulary table would be the
largest frozen tensor that is not: GPT-Neo-1.3B's 50,257 x 2,048 (tied to the LM head) is 8% of
its weights, and at 2 bytes it was 0.16 of the 1.16 bytes per weight of an 8-bit backbone and 0.19
of NF4's 0.71 (BENCHMARKS.md). ``quantize_embeddings`` holds it in int8 per row (absmax / 127: per
token for a lookup, per output channel for the head) whatever the layers' format: int8 is the
most exact of the three at 1 byte, and the table is a small share of a 4-bit model's bytes.

A tied head shares the table (one ``QuantizedTable``, a child of both modules, as transformers
ties the two weights). The table's rows are padded to a multiple of 64 with zero rows, which the
head slices off its logits: with an odd vocabulary (GPT-2 / GPT-Neo: 50,257) the logits' rows of
odd length keep cuBLAS on slow kernels (the bf16 head is padded for the same reason,
``RMTModel._lm_logits``). The head's matmul dequantizes inside ``_Int8Linear``: nothing but the
int8 table is kept between forward and backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantized_linear import _Int8Linear, autocast_input, dequantize_scaled, quantize_int8

ROW_MULTIPLE = 64


class QuantizedTable(nn.Module):
    """A frozen (rows, dim) matrix in int8 with one fp32 scale a row, ``rows`` padded to a multiple
    of 64 with zero rows: read by rows (``lookup``) or multiplied (``matmul``), in ``compute_dtype``."""

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.num_rows, self.dim = weight.shape
        self.compute_dtype = compute_dtype or weight.dtype
        qweight, scale = quantize_int8(F.pad(weight.detach(), (0, 0, 0, -self.num_rows % ROW_MULTIPLE)))
        self.weight = nn.Parameter(qweight, requires_grad=False)
        self.register_buffer("weight_scale", scale)

    def held_weights(self) -> int:
        return self.num_rows * self.dim

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight[ids] * self.weight_scale[ids]).to(self.compute_dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8Linear.apply(autocast_input(x), self.weight, self.weight_scale)[..., :self.num_rows]

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        rows = slice(0, self.num_rows)
        return dequantize_scaled(self.weight[rows], self.weight_scale[rows], dtype or self.compute_dtype)

    def extra_repr(self) -> str:
        return f"rows={self.num_rows}, dim={self.dim}, int8, compute_dtype={self.compute_dtype}"


class QuantizedEmbedding(nn.Module):
    """A frozen token embedding read from a ``QuantizedTable`` (``nn.Embedding``'s sizes and
    ``padding_idx``; ``dequantize()`` gives the table as lookups see it)."""

    def __init__(self, table: QuantizedTable, padding_idx: int | None = None):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.num_rows, table.dim
        self.padding_idx = padding_idx

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.table.compute_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.lookup(ids)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.table.dequantize(dtype)


class QuantizedHead(nn.Module):
    """A frozen LM head multiplying by a ``QuantizedTable`` (``nn.Linear``'s sizes; ``bias`` kept
    in full precision)."""

    def __init__(self, table: QuantizedTable, bias: torch.Tensor | None = None):
        super().__init__()
        self.table = table
        self.out_features, self.in_features = table.num_rows, table.dim
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.table.compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.table.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.table.dequantize(dtype)


def quantize_embeddings(model: nn.Module, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> int:
    """Replace ``model``'s token embedding and LM head (``get_input_embeddings`` /
    ``get_output_embeddings``, when they are a plain ``nn.Embedding`` / ``nn.Linear``) by int8
    ones on ``device`` computing in ``dtype``; a head tied to the embedding (the same weight)
    shares its table. Returns the number of tables made (0, 1 or 2)."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tables = 0
    table = None
    if type(embedding) is nn.Embedding:
        table = QuantizedTable(embedding.weight.detach().to(device, dtype), dtype)
        model.set_input_embeddings(QuantizedEmbedding(table, embedding.padding_idx))
        tables += 1
    if type(head) is nn.Linear:
        tied = table is not None and head.weight is embedding.weight
        if not tied:
            table = QuantizedTable(head.weight.detach().to(device, dtype), dtype)
            tables += 1
        bias = None if head.bias is None else head.bias.detach().to(device, dtype)
        model.set_output_embeddings(QuantizedHead(table, bias))
    model.requires_grad_(False)
    return tables


def embedding_matrix(embedding: nn.Module) -> torch.Tensor:
    """The token embedding matrix as lookups see it (a quantized one dequantized)."""
    return embedding.dequantize() if isinstance(embedding, QuantizedEmbedding) else embedding.weight


def compute_dtype_of(embedding: nn.Module) -> torch.dtype:
    """The dtype a token embedding returns (a quantized one's compute dtype, not int8)."""
    return embedding.compute_dtype if isinstance(embedding, QuantizedEmbedding) else embedding.weight.dtype
