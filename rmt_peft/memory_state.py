"""A memory state that outlives the process: read a document once, ask it questions later.

A state is what a reader holds after a document: the memory after its whole segments and the
tokens after them that do not fill a segment yet (``MemoryStream.pending``). Answering a question
from a state (``MemoryState.generate``) reads those tokens + the question from the memory, which is
exactly what ``rmt.generate(document + question)`` computes (left alignment), for any document length.

On disk a state is one safetensors file whose header records the ``MemoryConfig`` and hidden size
it was read with; loading it for a model that reads differently (another memory kind included) is a
``UserError`` naming what differs. With memory tokens it is small (a few KiB: ``num_memory_tokens x
hidden`` floats and fewer than ``segment_size`` token ids); an associative memory holds a matrix
per decoder layer (``layers x 6 * associative_key_size x hidden`` floats: 75 MiB for GPT-Neo-1.3B
with keys of 64), still the same size for any document length.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .associative import AssociativeState
from .errors import UserError
from .fileio import atomic_path
from .memory import MemoryConfig

FORMAT = "rmt-peft-memory/1"
# The MemoryConfig fields that decide what a memory means; the others only change training
# (memory_update: "replace" or "gated" writes, read as None from a config without the field).
READING_FIELDS = ("memory_kind", "num_memory_tokens", "segment_size", "segment_alignment", "memory_update",
                  "associative_key_size", "associative_correction", "associative_normalizer_floor")


@dataclass
class MemoryState:
    """memory: (1, num_memory_tokens, hidden) fp32, or an ``AssociativeState`` of one sample;
    pending: (1, n) token ids not read yet (n < segment_size + 1); num_tokens: tokens read in all
    (pending included); info: free-form strings kept in the file (the document's name, the model's)."""

    memory: torch.Tensor | AssociativeState
    pending: torch.Tensor
    memory_config: MemoryConfig
    num_tokens: int
    info: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_stream(cls, stream, **info: str) -> "MemoryState":
        """The state of a ``MemoryStream`` (batch of one) after what it was fed."""
        if stream.batch_size != 1:
            raise UserError(f"a memory state holds one document; the stream reads a batch of {stream.batch_size}")
        memory = stream.memory.detach()
        memory = memory.to("cpu") if isinstance(memory, AssociativeState) else memory.float().cpu()
        return cls(memory, stream.pending.cpu(), stream.model.memory_config, stream.num_tokens, dict(info))

    @property
    def hidden_size(self) -> int:
        memory = self.memory
        return memory.matrices[0].shape[-1] if isinstance(memory, AssociativeState) else memory.shape[-1]

    def check(self, memory_config: MemoryConfig, hidden_size: int, where: str = "the memory state",
              num_layers: int | None = None) -> None:
        """UserError unless a model with ``memory_config`` and ``hidden_size`` reads like the one that made it."""
        differ = [f"{name}: {getattr(self.memory_config, name, None)!r} in {where}, "
                  f"{getattr(memory_config, name, None)!r} in the model" for name in READING_FIELDS
                  if getattr(self.memory_config, name, None) != getattr(memory_config, name, None)]
        if self.hidden_size != hidden_size:
            differ.append(f"hidden size: {self.hidden_size} in {where}, {hidden_size} in the model")
        if isinstance(self.memory, AssociativeState) and num_layers is not None and len(self.memory.matrices) != num_layers:
            differ.append(f"decoder layers: {len(self.memory.matrices)} in {where}, {num_layers} in the model")
        if differ:
            raise UserError(f"{where} was read by a model with another memory config ({'; '.join(differ)}); "
                            f"read the document again with this model")

    def generate(self, rmt, input_ids: torch.Tensor, **generate_kwargs):
        """``rmt.generate`` after the document: pending tokens + ``input_ids`` (1, n) from the memory."""
        self.check(*_reads(rmt))
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        ids = torch.cat([self.pending.to(input_ids.device), input_ids], dim=1)
        return rmt.generate(ids, memory=self.memory, **generate_kwargs)

    def save(self, path: str) -> str:
        """Write the state to ``path`` (a .safetensors file), atomically."""
        metadata = {"format": FORMAT, "memory_config": json.dumps(self.memory_config.to_dict()),
                    "num_tokens": str(self.num_tokens), "info": json.dumps(self.info)}
        if isinstance(self.memory, AssociativeState):
            metadata["empty"] = str(self.memory.empty)
            tensors = {f"associative_{k}": v.contiguous() for k, v in self.memory.detach().to("cpu").stacked().items()}
        else:
            tensors = {"memory": self.memory.detach().float().cpu().contiguous()}
        tensors["pending"] = self.pending.detach().long().cpu().contiguous()
        with atomic_path(path) as tmp:  # a full disk or a read-only folder: one line (fileio.disk_error)
            save_file(tensors, tmp, metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str) -> "MemoryState":
        """Read a state written by ``save``; UserError when ``path`` is missing or not such a file."""
        if not os.path.isfile(path):
            raise UserError(f"memory file {path} does not exist")
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise UserError(f"{path} is not a memory state saved by rmt-peft (format "
                                    f"{metadata.get('format')!r}, expected {FORMAT!r})")
                if "associative_matrices" in f.keys():
                    memory = AssociativeState.from_stacked(f.get_tensor("associative_matrices"),
                                                           f.get_tensor("associative_normalizers"),
                                                           empty=metadata.get("empty") == "True")
                else:
                    memory = f.get_tensor("memory")
                pending = f.get_tensor("pending")
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path} is not a safetensors memory state: {err}") from None
        config = MemoryConfig.from_dict(json.loads(metadata["memory_config"]))
        return cls(memory, pending, config, int(metadata["num_tokens"]), json.loads(metadata.get("info", "{}")))

    @classmethod
    def load_for(cls, path: str, rmt) -> "MemoryState":
        """``load`` + ``check`` against the model that will answer from it."""
        state = cls.load(path)
        config, hidden, layers = _reads(rmt)
        state.check(config, hidden, where=path, num_layers=layers)
        return state


def _reads(rmt) -> tuple[MemoryConfig, int, int | None]:
    """What a model reads a state with: its memory config, hidden size and (associative) layers."""
    associative = getattr(rmt.memory, "associative", None)
    layers = len(associative.layers) if associative is not None else None
    return rmt.memory_config, rmt.memory.memory_tokens.shape[1], layers
