"""RMTModel: the recurrent memory wrapper around any Hugging Face causal LM.

Per segment the backbone sees ``[memory + read_embedding ; segment ; memory + write_embedding]``
and its last hidden state (after the final norm) at the write positions is the next memory.
The loss is the ordinary shifted causal-LM loss over the whole input: the last token of segment
k predicts the first token of segment k+1, through the memory.

What keeps it cheap: the backbone's body is called directly (only the last hidden state, no
full-vocabulary logits), the loss is computed only at labelled positions in chunks, and with
``checkpoint_segments`` each segment is recomputed in backward (non-reentrant), so training
memory stays flat in the number of segments. ``MemoryStream`` reads inputs of any length
without gradients in constant memory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from . import associative, card, hub, saving
from .adapters import attach_lora, trainable_summary
from .associative import AssociativeState
from .attention import unpacked_rows
from .backbones import causal_lm_of, check_position_limit
from .errors import UserError
from .fileio import atomic_directory
from .inputs import IGNORE_INDEX, check_inputs
from .memory import (MIN_AUTO_BUDGET, MemoryConfig, MemoryParameters, activation_budget, allocated_bytes,
                     free_gpu_bytes, perturb, relative_change, segments_to_keep)
from .quantized_embedding import compute_dtype_of, embedding_matrix
from .speedups import (GRAPH_AFTER_SEGMENTS, SegmentGraph, cache_dequantized_weights, cache_pays, graph_pays,
                       compile_model, compiled_scope, merge_pays, merged_lora_key,
                       merged_lora_view, merged_lora_weights, save_matmuls_policy, speed_up, transformer_blocks)

logger = logging.getLogger("rmt_peft")


class _Penalties:
    """The training-only terms on the memory that join the loss: the stability loss (the memory's
    relative change per transition after the first), the associative write cost (the mean
    write gate per segment) and the associative write-back loss (its mean per segment)."""

    def __init__(self, cfg: MemoryConfig, on: bool, num_segments: int, device):
        self.cfg, self.num_segments = cfg, num_segments
        self.stabilize = on and cfg.memory_stability_weight > 0 and num_segments > 1
        self.write_cost = on and cfg.associative and cfg.associative_write_cost > 0
        self.write_back = on and cfg.associative and cfg.associative_write_back_weight > 0
        self.drift = torch.zeros((), dtype=torch.float32, device=device)
        self.opened = torch.zeros((), dtype=torch.float32, device=device)
        self.written_back = torch.zeros((), dtype=torch.float32, device=device)

    def count_gates(self, new_memory):
        """``new_memory`` without the write gate and write-back loss its segment measured (the terms
        count them): the state handed on holds the memory only (a forward without labels measures
        and drops them)."""
        gate, back = getattr(new_memory, "write_gate", None), getattr(new_memory, "write_back", None)
        if gate is None and back is None:
            return new_memory
        if self.write_cost and gate is not None:
            self.opened = self.opened + gate
        if self.write_back and back is not None:
            self.written_back = self.written_back + back
        return dataclasses.replace(new_memory, write_gate=None, write_back=None)

    def count_change(self, index: int, clean, memory) -> None:
        # Against the memory before its noise: the update should return perturbed states to
        # where they were (an attractor), not carry the perturbation on.
        if self.stabilize and index > 0:
            change = associative.relative_change if self.cfg.associative else relative_change
            self.drift = self.drift + change(clean, memory, self.cfg.memory_stability_tolerance,
                                             self.cfg.memory_stability_power)

    def added_to(self, loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(``loss`` with the terms; {"memory_drift", "write_gate", "write_back": the mean of each term
        that is on, detached})."""
        drift = gate = back = None
        if self.stabilize:
            drift = self.drift / (self.num_segments - 1)
            loss = loss + self.cfg.memory_stability_weight * drift
        if self.write_cost:
            gate = self.opened / self.num_segments
            loss = loss + self.cfg.associative_write_cost * gate
        if self.write_back:
            back = self.written_back / self.num_segments
            loss = loss + self.cfg.associative_write_back_weight * back
        terms = {"memory_drift": drift, "write_gate": gate, "write_back": back}
        return loss, {name: term.detach() for name, term in terms.items() if term is not None}


class _Tally:
    """What forward sums over the segments: the loss and its token count, each segment's mean loss
    (NaN without labelled tokens) and count, and the logits asked for."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.losses, self.counts, self.logits = [], [], []

    def add(self, loss: torch.Tensor, count: torch.Tensor, logits: torch.Tensor | None) -> None:
        self.loss_sum, self.count = self.loss_sum + loss, self.count + count
        nan = torch.full_like(loss, float("nan"))
        self.losses.append(torch.where(count > 0, loss / count.clamp(min=1), nan).detach())
        self.counts.append(count.detach())
        if logits is not None:
            self.logits.append(logits)


@dataclass
class RMTOutput(ModelOutput):
    """loss: mean token loss over all labelled positions; logits: (batch, tokens, vocab) with
    memory positions removed (None when labels were given, unless asked for); memory: the final
    memory (batch, num_memory_tokens, hidden), or an ``AssociativeState`` for
    ``memory_kind="associative"``; segment_losses / segment_token_counts: per
    segment (NaN where a segment has no labelled token), detached, for metrics; memory_drift:
    with ``memory_stability_weight`` in training, the mean relative squared change of the memory
    per transition after the first (part of ``loss``, times the weight); write_gate: with
    ``associative_write_cost`` in training, the mean write gate over the segments (with
    ``associative_write_cost_form="softplus"`` the mean softplus of the gates' logits: what the
    cost charges; part of ``loss``, times the cost); write_back: with
    ``associative_write_back_weight`` in training, the mean write-back loss over the segments
    (part of ``loss``, times the weight)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    memory: torch.Tensor | AssociativeState | None = None
    segment_losses: torch.Tensor | None = None
    segment_token_counts: torch.Tensor | None = None
    memory_drift: torch.Tensor | None = None
    write_gate: torch.Tensor | None = None
    write_back: torch.Tensor | None = None


def segment_bounds(length: int, segment_size: int, alignment: str = "left") -> list[tuple[int, int]]:
    """[start, end) of each segment. "left": the last segment may be short; "right": the first."""
    if length <= 0:
        raise ValueError(f"the input is empty (length {length}); RMTModel needs at least one token")
    starts = range(0, length, segment_size)
    if alignment == "right":
        first = length % segment_size
        starts = ([0] if first else []) + list(range(first, length, segment_size))
    ends = list(starts[1:]) + [length]
    return list(zip(starts, ends))


def context_split(length: int, first_scored: int, segment_size: int, alignment: str = "left") -> int:
    """Start of the segment that holds position ``first_scored`` (a position whose logits are needed)."""
    for start, end in segment_bounds(length, segment_size, alignment):
        if start <= first_scored < end:
            return start
    raise ValueError(f"position {first_scored} is outside an input of {length} tokens")


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Target of position t is labels[t+1]; the last position has none."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _plan(attention_mask: torch.Tensor | None, targets: torch.Tensor | None,
          bounds: list[tuple[int, int]]) -> tuple[bool, list[int | None]]:
    """Whether the mask pads anything, and each segment's labelled-target count, read from the
    device in one sync, so the segment loop (and its recompute in backward) never waits on it."""
    checks = [] if attention_mask is None else [(attention_mask == 0).any().long()]
    if targets is not None:
        checks += [(targets[:, s:e] != IGNORE_INDEX).sum() for s, e in bounds]
    values = torch.stack(checks).tolist() if checks else []
    padded = bool(values.pop(0)) if attention_mask is not None else False
    return padded, values if targets is not None else [None] * len(bounds)


def _pad_rows(tensor: torch.Tensor | None, multiple: int = 64) -> torch.Tensor | None:
    """Zero rows appended to a multiple of ``multiple`` rows (dim 0)."""
    if tensor is None:
        return None
    pad = [0, 0] * (tensor.dim() - 1) + [0, -tensor.shape[0] % multiple]
    return F.pad(tensor, pad)


def _padded_head_pays(head: nn.Module, hidden: torch.Tensor) -> bool:
    """Pad only a frozen plain CUDA nn.Linear with a row count cuBLAS cannot align and no hooks
    (DeepSpeed ZeRO-3 and accelerate offload gather or move the weight in hooks, which this would skip)."""
    weight = head.weight if type(head) is nn.Linear else None
    return (weight is not None and hidden.is_cuda and weight.is_cuda and not weight.requires_grad
            and weight.shape[0] % 8 != 0 and not head._forward_pre_hooks and not head._forward_hooks
            and not hasattr(weight, "ds_id"))


def _refuse_layer_checkpointing(causal_lm: nn.Module) -> None:
    """The associative memory's hooks run inside the decoder layers and find their state in the
    segment's call; per-layer activation checkpointing recomputes a layer in backward, after that
    call: it would read no memory and give wrong gradients."""
    if any(getattr(block, "gradient_checkpointing", False) for block in transformer_blocks(causal_lm)):
        raise UserError("memory_kind='associative' cannot train with per-layer gradient checkpointing "
                        "(training.gradient_checkpointing / gradient_checkpointing_enable): use "
                        "memory.checkpoint_segments=true, which recomputes whole segments and keeps memory flat")


def _drop_causal_lm_keys(module, state_dict, prefix, *args) -> None:
    """State dicts of earlier versions also held the backbone under ``causal_lm.*`` (the same
    tensors as ``backbone.*``): drop those keys so the old dicts still load, strict or not."""
    for key in [k for k in state_dict if k.startswith(prefix + "causal_lm.")]:
        del state_dict[key]


class RMTModel(nn.Module):
    """Recurrent Memory Transformer around a causal LM (plain, quantized or with peft LoRA)."""

    def __init__(self, backbone: nn.Module, memory_config: MemoryConfig):
        super().__init__()
        self.backbone = backbone
        self.memory_config = memory_config
        # The causal LM lies inside ``backbone`` (it is the backbone, or peft wraps it): a plain
        # attribute, not a second submodule, so state_dict() holds each weight once (backbone.*).
        object.__setattr__(self, "_causal_lm", causal_lm_of(backbone))
        self.register_load_state_dict_pre_hook(_drop_causal_lm_keys)
        check_position_limit(self.causal_lm.config, memory_config)
        embeddings = self.causal_lm.get_input_embeddings()
        std = memory_config.memory_init_std
        if std is None:
            std = float(embedding_matrix(embeddings).detach().float().std())
        self._padded_head: tuple | None = None  # (weight key, padded copy), see _lm_logits
        self._merged_lora: tuple | None = None  # (merged_lora_key, view of the copies), see _stream_view
        self._stream_notes: dict[str, str | None] = {}  # the last reason logged for each default of the streams
        self._auto_kept: int | None = None  # checkpoint_segments="auto": segments kept at the last step
        # from_backbone's compile (compile, scope, budget, and whether "auto" may lower the budget),
        # and the budget "auto" chose, applied at the next forward (_keep_what_fits)
        self._compiled: dict | None = None
        self._pending_budget: float | None = None
        self.pad_lm_head = True  # an exact speed-up on CUDA (see _lm_logits); from_backbone(speedups=False) clears it
        blocks = transformer_blocks(self.causal_lm) if memory_config.associative else []
        self.memory = MemoryParameters(memory_config, embeddings.embedding_dim, std, num_layers=len(blocks),
                                       device=next(embeddings.parameters()).device)
        if memory_config.associative:
            self.memory.associative.attach(blocks)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, backbone: nn.Module, memory_config: MemoryConfig, lora=None,
                      verbose: bool = True, *, speedups: bool = True, compile: bool | str = False,
                      compile_scope: str = "blocks", compile_memory_budget: float | None = None,
                      cache_dequantized: bool | None = None) -> "RMTModel":
        """Wrap ``backbone``. With ``lora`` (a peft ``LoraConfig``, a preset "attention" /
        "all-linear" or a dict, see ``adapters.lora_config``) the backbone is frozen and only LoRA
        and the memory parameters train; with ``lora=None`` the backbone keeps its requires_grad.
        ``verbose`` prints the trainable parameter summary.

        ``speedups`` (default True) applies the exact speed-ups (``rmt_peft.speedups.speed_up``:
        SDPA attention for GPT-Neo, the one-kernel GELU, the LM head padded on CUDA): same
        outputs, less time and memory. False undoes them: the backbone computes as transformers
        built it (e.g. eager attention, for ``output_attentions``). ``compile`` compiles each
        decoder block (True, or a torch.compile mode such as "reduce-overhead"): 1.7-2.5x faster
        training on a GPU, tens of seconds of compiling per new shape (docs/performance.md).
        ``compile_scope="body"`` compiles the decoder stack whole instead (``speedups.compile_body``:
        one compiled call a segment, faster where the host is the bottleneck, longer to compile).
        ``compile_memory_budget`` < 1: the compiled graphs keep about that share of their
        activations and recompute the rest in backward (``speedups.compiled_call``): smaller
        segments, so ``checkpoint_segments="auto"`` keeps more of them. None (default): 1, until
        ``checkpoint_segments="auto"`` finds that whole segments would be recomputed; it then
        lowers the budget so that all fit (``memory.activation_budget``, logged) and compiles again.

        ``cache_dequantized`` (4-bit backbones): keep each weight dequantized instead of
        dequantizing it on every call (``speedups.cache_dequantized_weights``: same values, 2
        bytes per weight). None (default) turns it on where it costs little: weights on a CUDA
        GPU whose copies take at most a tenth of its memory (``speedups.cache_pays``); the
        decision is logged. Applied before compiling, so compiled blocks see the cached layers."""
        if lora is not None:
            backbone = attach_lora(backbone, lora)
        model = cls(backbone, memory_config)
        if cache_dequantized is None:
            cache_dequantized, why = cache_pays(model.causal_lm)
            if why:
                logger.info(f"dequantized-weight cache {why}; from_backbone(cache_dequantized=...) overrides")
        if cache_dequantized:
            cache_dequantized_weights(model.causal_lm)
        budget = 1.0 if compile_memory_budget is None else compile_memory_budget  # None: 1, "auto" may lower it
        speed_up(model.causal_lm, compile=compile, enable=speedups, compile_scope=compile_scope, memory_budget=budget)
        if compile:
            model._compiled = {"compile": compile, "scope": compile_scope, "auto": compile_memory_budget is None,
                               "budget": budget}
        model.pad_lm_head = speedups
        if verbose:
            print(model.trainable_summary())
        return model

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The transformers causal LM inside ``backbone`` (under peft's wrappers, if any)."""
        return self._causal_lm

    def trainable_summary(self) -> str:
        return trainable_summary(self)

    # -- saving and loading (the folder's format: saving.py) --------------------------------
    def save_pretrained(self, save_directory: str, base_model: str | None = None, repo_id: str | None = None,
                        extra_files: list[str] = ()) -> str:
        """PEFT adapter files (or full weights without LoRA) + memory_config.json + memory.safetensors
        + README.md (see saving.py), written whole or not at all. ``base_model``: the name recorded as
        the base (default: where the backbone was loaded from; needed when it was built in memory);
        ``repo_id``: the Hub name the card uses; ``extra_files``: files put beside the model (a
        tokenizer's files, for instance)."""
        base = saving.base_name(self.backbone, self.causal_lm, base_model)
        layers = len(self.memory.associative.layers) if self.memory_config.associative else 0
        metadata = saving.memory_metadata(self.causal_lm, base, layers)
        with atomic_directory(save_directory) as tmp:
            saving.write_backbone(self.backbone, self.causal_lm, tmp, base)
            saving.write_memory(tmp, self.memory_config, self.memory.state_dict(), metadata)
            for path in extra_files:
                shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
            card.write_model_card(tmp, repo_id)
        return save_directory

    @classmethod
    def from_pretrained(cls, name_or_path: str, quantization: str | None = None, dtype=None, device_map=None,
                        base_model: str | None = None, is_trainable: bool = False, revision: str | None = None,
                        token: str | None = None, **load_kwargs) -> "RMTModel":
        """Rebuild from a folder or Hub repo saved by ``save_pretrained``: the backbone as
        ``saving.load_saved_backbone`` loads it (``quantization`` / ``dtype`` / ``device_map`` / other
        ``load_backbone`` options; ``base_model`` when a LoRA adapter's base moved), then the memory.
        In eval mode and frozen unless ``is_trainable``."""
        folder = saving.resolve_folder(name_or_path, revision, token)
        kind = saving.folder_kind(folder)
        memory_config, tensors, metadata = saving.read_memory(folder)
        backbone = saving.load_saved_backbone(folder, kind, metadata, base_model, is_trainable, quantization=quantization,
                                              dtype=dtype, device_map=device_map, **load_kwargs)
        rmt = cls(backbone, memory_config)
        device = rmt.memory.memory_tokens.device
        rmt.memory.load_state_dict({k: v.to(device) for k, v in tensors.items()})
        rmt.memory.requires_grad_(is_trainable)
        return rmt.train(is_trainable)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None, base_model: str | None = None):
        """Save to a temporary folder and upload exactly that folder to ``repo_id``."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(os.path.join(tmp, "model"), base_model=base_model, repo_id=repo_id)
            saving.validate_folder(folder)
            return hub.upload(folder, repo_id, private=private, token=token, commit_message=commit_message)

    def merge_and_unload(self, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> "RMTModel":
        """A new RMTModel whose backbone is a plain ``dtype`` copy of this one's with LoRA merged in
        (``saving.merged_causal_lm``: 8-bit / 4-bit weights dequantized first), built on ``device``
        (the CPU by default, so a GPU holding the trained model needs no room for it); it needs no
        peft to load once saved, and this model is left unchanged."""
        peft_model = saving.lora_of(self.backbone)
        if peft_model is None:
            raise ValueError("merge needs a model with LoRA adapters; this RMTModel has none (save it as it is)")
        out = type(self)(saving.merged_causal_lm(peft_model, self.causal_lm, dtype, device), self.memory_config)
        out.pad_lm_head = self.pad_lm_head
        out.memory.load_state_dict({k: v.detach().to(device) for k, v in self.memory.state_dict().items()})
        return out.eval()

    @property
    def config(self):
        """The backbone's transformers config (Trainer and peft look for ``model.config``)."""
        return self.causal_lm.config

    def add_model_tags(self, tags) -> None:
        """Tags for the model card (trl's trainers call this); they go on the backbone."""
        self.causal_lm.add_model_tags(tags)

    @property
    def memory_tokens(self) -> nn.Parameter:
        return self.memory.memory_tokens

    @property
    def read_embedding(self) -> nn.Parameter | None:
        """None for the associative kind (its memory tokens are only written from)."""
        return getattr(self.memory, "read_embedding", None)

    @property
    def write_embedding(self) -> nn.Parameter | None:
        return getattr(self.memory, "write_embedding", None)

    def initial_memory(self, batch_size: int) -> torch.Tensor | AssociativeState:
        return self.memory.initial_memory(batch_size)

    # -- one segment ----------------------------------------------------------------------
    def _lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.causal_lm.get_output_embeddings()
        if self.pad_lm_head and _padded_head_pays(head, hidden):
            # Same values as head(hidden). With an odd vocabulary (GPT-2/GPT-Neo: 50257) the
            # logits and their gradient have rows of odd length, which keeps cuBLAS on slow
            # kernels in forward and backward; padding the vocabulary to 50304 avoids both.
            logits = F.linear(hidden, self._padded_head_weight(head.weight), _pad_rows(head.bias))
            logits = logits[..., :head.weight.shape[0]]
        else:
            logits = head(hidden)
        cap = getattr(self.causal_lm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _padded_head_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The frozen LM head weight padded once (not per loss chunk: each chunk saves its weight
        for backward); rebuilt when the weight changes."""
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.shape)
        if self._padded_head is None or self._padded_head[0] != key:
            self._padded_head = (key, _pad_rows(weight.detach()))  # a plain attribute, not in state dicts
        return self._padded_head[1]

    def _stream_view(self, merge_lora: bool | None) -> merged_lora_view:
        """The view a stream reads through: merged LoRA copies, or none (peft's own layers). None
        decides with ``speedups.merge_pays``, logged when the reason changes (not once per stream).
        In eval mode the view and its copies stay with the model while the layers' tensors are
        unchanged, so the streams of one evaluation (one per document or batch) share them instead
        of merging again; ``train()`` frees them."""
        if merge_lora is None:
            merge_lora, why = merge_pays(self)
            self._note_stream_default("with LoRA merged into copies of the weights", why, "merge_lora")
        if not merge_lora:
            return merged_lora_view(self, {})
        if self.training:  # the weights change at every step: nothing to keep
            return merged_lora_view(self, merged_lora_weights(self))
        key = merged_lora_key(self)
        if self._merged_lora is None or self._merged_lora[0] != key:
            self._merged_lora = None  # the old copies go before the new ones are made
            self._merged_lora = (key, merged_lora_view(self, merged_lora_weights(self)))
        return self._merged_lora[1]

    def _own_precision(self):
        """A context for reading (``read``, streams): inside ``torch.autocast`` to the dtype the
        backbone already computes in, autocast is switched off. It would only add per-op casts
        (norms and softmax up to fp32 and back, LoRA's fp32 weights down; 1.4-1.7x slower
        streams, BENCHMARKS.md), so reading under it gives exactly what reading without it gives.
        An autocast to another dtype (an fp32 model read in bf16) is the caller's choice: kept."""
        embeddings = self.causal_lm.get_input_embeddings()
        device = next(embeddings.parameters()).device.type
        if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == compute_dtype_of(embeddings):
            return torch.autocast(device, enabled=False)
        return contextlib.nullcontext()

    def _note_stream_default(self, what: str, why: str | None, argument: str) -> None:
        """Log a stream default's decision when its reason changes (not once per stream)."""
        if why and why != self._stream_notes.get(argument):
            logger.info(f"stream {what}: {why}; stream({argument}=...) overrides")
        self._stream_notes[argument] = why

    def train(self, mode: bool = True) -> "RMTModel":
        if mode:
            self._merged_lora = None  # training updates the weights the copies were made from
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        # .to() / .cpu() / .half(): the cached copies would stay where they were (rebuilt when needed)
        self._merged_lora = self._padded_head = None
        return super()._apply(fn, recurse)

    def _segment(self, memory, input_ids, attention_mask, target_ids, want_logits: bool,
                 num_labelled: int | None = None):
        """Run one segment. attention_mask None means no padding. ``num_labelled`` (the count of
        labelled targets, if the caller knows it) spares a host sync. Returns (new memory, loss
        sum, labelled count, logits or None)."""
        m = self.memory_config.num_memory_tokens
        is_associative = self.memory_config.associative
        batch, n = input_ids.shape
        embeds = self.causal_lm.get_input_embeddings()(input_ids)
        mask = attention_mask
        if is_associative:  # [segment ; memory tokens]: the same tokens every segment, written from
            write = self.memory.memory_tokens.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
            embeds = torch.cat([embeds, write], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(batch, m)], dim=1)
        elif m:
            read = (memory + self.memory.read_embedding).to(embeds.dtype)
            write = (memory + self.memory.write_embedding).to(embeds.dtype)
            embeds = torch.cat([read, embeds, write], dim=1)
            if mask is not None:
                ones = mask.new_ones(batch, m)
                mask = torch.cat([ones, mask, ones], dim=1)
        if mask is None:
            # No mask lets transformers skip building one (and its host sync) and use causal kernels.
            positions = torch.arange(embeds.shape[1], device=embeds.device).expand(batch, -1)
        else:
            # Positions count only attended tokens, so padding never shifts them (OPT does this
            # itself; the others would not) and a padded sample computes what it would alone.
            positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        body = self.causal_lm.base_model
        # unpacked_rows: no mask without padding, also inside CUDA-graph captures and compiled bodies
        if is_associative:
            cfg = self.memory_config
            learning = self.training and torch.is_grad_enabled()
            with self.memory.associative.session(memory, write_tokens=m, gate_noise=cfg.associative_gate_noise,
                                                 hard_gates=cfg.associative_hard_gates,
                                                 gate_threshold=cfg.associative_gate_threshold,
                                                 hard_in_training=cfg.associative_hard_gates_in_training,
                                                 measure_gates=learning and cfg.associative_write_cost > 0,
                                                 cost_form=cfg.associative_write_cost_form,
                                                 forced_rate=cfg.associative_forced_write_rate,
                                                 measure_write_back=learning and cfg.associative_write_back_weight > 0
                                                 ) as session, \
                    unpacked_rows():
                hidden = body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                              use_cache=False).last_hidden_state
            new_memory, hidden = session.result(), hidden[:, :n]
        else:
            with unpacked_rows():
                hidden = body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                              use_cache=False).last_hidden_state
            # A copy, not a view: a view would keep this segment's whole hidden state alive for as
            # long as the memory lives (every segment of a checkpointed BPTT step).
            if m and self.memory_config.memory_update != "replace":
                new_memory = self.memory.update(memory, hidden[:, m + n:])
            else:
                new_memory = hidden[:, m + n:].clone()
            hidden = hidden[:, m:m + n]

        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        count = torch.zeros((), dtype=torch.long, device=hidden.device)
        if target_ids is not None:
            labelled = (target_ids != IGNORE_INDEX).flatten()
            selected, targets = hidden.flatten(0, 1), target_ids.flatten()
            if num_labelled is None:
                num_labelled = int(labelled.sum())
            if num_labelled < labelled.numel():  # gather without a host sync: the size is known
                index = torch.nonzero_static(labelled, size=num_labelled).squeeze(1)
                selected, targets = selected.index_select(0, index), targets.index_select(0, index)
            chunk = self.memory_config.loss_chunk_size
            for i in range(0, num_labelled, chunk):
                logits = self._lm_logits(selected[i:i + chunk]).float()
                loss_sum = loss_sum + F.cross_entropy(logits, targets[i:i + chunk], reduction="sum")
            count = labelled.sum()
        logits = self._lm_logits(hidden) if want_logits else None
        return new_memory, loss_sum, count, logits

    def _keep_what_fits(self, free: int, segment_bytes: int, num_segments: int) -> int:
        """checkpoint_segments="auto": how many segments keep their activations (``segments_to_keep``),
        logged when the decision changes."""
        keep = segments_to_keep(free, segment_bytes, num_segments)
        compiled = self._compiled
        # only graphs still compiled as from_backbone left them (the user may have undone the compile)
        if keep < num_segments and compiled and compiled["auto"] and compiled_scope(self.causal_lm) == compiled["scope"]:
            # whole segments would be recomputed: graphs that keep less recompute less for the same room.
            # The segment was measured at the current budget, so the new one is relative to it (a
            # curriculum that adds segments lowers it again).
            current = compiled["budget"]
            budget = max(MIN_AUTO_BUDGET, current * activation_budget(free, segment_bytes, num_segments))
            if budget < current:
                compiled["budget"] = self._pending_budget = budget
                logger.info(f"checkpoint_segments='auto': {num_segments - keep} of {num_segments} segments would be "
                            f"recomputed whole; the compiled graphs keep {budget:.2f} of their activations from the "
                            f"next step on (compile_memory_budget: a number keeps yours)")
        if keep != self._auto_kept:
            logger.info(f"checkpoint_segments='auto': {keep} of {num_segments} segments keep their activations "
                        f"({segment_bytes / 2**30:.2f} GiB each, measured; {free / 2**30:.1f} GiB free)")
        self._auto_kept = keep
        return keep

    def _checkpoint_policy(self) -> dict:
        """torch.utils.checkpoint options for MemoryConfig.checkpoint_policy."""
        if self.memory_config.checkpoint_policy == "recompute_all":
            return {}
        policy = save_matmuls_policy(self.causal_lm.get_output_embeddings().out_features)
        return {"context_fn": partial(create_selective_checkpoint_contexts, policy)}

    # -- the recurrence -------------------------------------------------------------------
    def check_inputs(self, input_ids, attention_mask=None, labels=None, memory=None) -> None:
        """ValueError naming the argument for inputs forward / generate cannot process (inputs.py)."""
        embeddings = self.causal_lm.get_input_embeddings()  # its sizes stay whole under ZeRO-3
        is_associative = self.memory_config.associative
        check_inputs(input_ids, attention_mask, labels, None if is_associative else memory,
                     vocab_size=embeddings.num_embeddings,
                     memory_shape=(self.memory_config.num_memory_tokens, embeddings.embedding_dim))
        if is_associative and memory is not None:
            self._check_state(memory, input_ids.shape[0])

    def _check_state(self, state, batch: int) -> None:
        """ValueError naming ``memory`` unless it is an associative state this model can read."""
        assoc = self.memory.associative
        hidden = self.memory.memory_tokens.shape[1]
        if not isinstance(state, AssociativeState):
            raise ValueError(f"memory must be an AssociativeState for memory_kind='associative' (what forward, "
                             f"read and streams return), got {type(state).__name__}")
        expected = (len(assoc.layers), assoc.key_features, hidden)
        found = (len(state.matrices), *state.matrices[0].shape[1:]) if state.matrices else (0,)
        if found != expected or state.batch_size not in (1, batch):
            raise ValueError(f"memory (an AssociativeState of {found[0]} layers x {tuple(found[1:])} for "
                             f"{state.batch_size} samples) does not fit this model: expected {expected[0]} layers x "
                             f"{expected[1:]} for 1 or {batch} samples")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                return_logits: bool | None = None) -> RMTOutput:
        """Process ``input_ids`` (batch, any length) segment by segment.

        ``memory`` continues from an earlier state (default: the learned initial memory).
        ``return_logits`` defaults to True without labels and False with them.
        """
        self.check_inputs(input_ids, attention_mask, labels, memory)
        if labels is not None and labels.dtype != torch.long:  # int32 labels, like int32 ids (cross_entropy: long)
            labels = labels.long()
        cfg = self.memory_config
        batch, length = input_ids.shape
        bounds = segment_bounds(length, cfg.segment_size, cfg.segment_alignment)
        if return_logits is None:
            return_logits = labels is None
        targets = shift_labels(labels) if labels is not None else None
        memory = self._start_memory(memory, batch) if cfg.associative else memory
        if memory is None:
            memory = self.initial_memory(batch)
        if cfg.associative and self.training and torch.is_grad_enabled():
            _refuse_layer_checkpointing(self.causal_lm)
        first_loss_segment = 0 if cfg.loss_segments is None else max(0, len(bounds) - cfg.loss_segments)
        use_checkpoint = cfg.checkpoint_segments and self.training and torch.is_grad_enabled()
        # "auto" on a GPU: the first segment keeps its activations and measures them (_keep_what_fits)
        measure = (use_checkpoint and cfg.checkpoint_segments == "auto" and len(bounds) > 1
                   and allocated_bytes(input_ids.device) is not None)
        if measure and self._pending_budget is not None:
            compile_model(self.causal_lm, self._compiled["compile"], self._compiled["scope"], self._pending_budget)
            self._pending_budget = None
        kept_last = cfg.uncheckpointed_segments
        learning = cfg.num_memory_tokens > 0 and self.training and torch.is_grad_enabled()
        noisy = learning and cfg.memory_noise_std > 0
        penalties = _Penalties(cfg, learning and labels is not None, len(bounds), input_ids.device)
        clean = memory  # the memory before its training noise (what the stability loss compares with)
        padded, labelled = _plan(attention_mask, targets, bounds[first_loss_segment:])
        labelled = [None] * first_loss_segment + labelled
        seg_mask = None

        tally = _Tally(input_ids.device)
        for index, (start, end) in enumerate(bounds):
            if cfg.bptt_depth is not None and 0 < index < len(bounds) - cfg.bptt_depth:
                # Truncation is aligned to the end, where memory tasks put their loss (the
                # reference's k2): only the last bptt_depth transitions keep their gradient.
                memory = memory.detach()
            if padded:
                seg_mask = attention_mask[:, start:end]
            seg_targets = targets[:, start:end] if targets is not None and index >= first_loss_segment else None
            args = (memory, input_ids[:, start:end], seg_mask, seg_targets, return_logits, labelled[index])
            if measure and index == 0:
                free, before = free_gpu_bytes(input_ids.device), allocated_bytes(input_ids.device)
                new_memory, s_loss, s_count, s_logits = self._segment(*args)
                kept_last = self._keep_what_fits(free, allocated_bytes(input_ids.device) - before,
                                                 len(bounds)) - 1  # the first one is kept already
            elif use_checkpoint and index < len(bounds) - kept_last:
                new_memory, s_loss, s_count, s_logits = checkpoint(self._segment, *args, use_reentrant=False,
                                                                   **self._checkpoint_policy())
            else:
                new_memory, s_loss, s_count, s_logits = self._segment(*args)
            new_memory = penalties.count_gates(new_memory)
            memory, active = self._carried(new_memory, memory, clean, seg_mask if padded else None)
            penalties.count_change(index, clean, memory)
            clean = memory
            if noisy and index + 1 < len(bounds):
                memory = self._perturbed(memory, cfg.memory_noise_std, active if padded else None)
            tally.add(s_loss, s_count, s_logits if return_logits else None)

        loss, terms = None, {}
        if labels is not None:
            loss, terms = penalties.added_to(tally.loss_sum / tally.count.clamp(min=1))
        return RMTOutput(loss=loss, logits=torch.cat(tally.logits, dim=1) if return_logits else None, memory=memory,
                         segment_losses=torch.stack(tally.losses), segment_token_counts=torch.stack(tally.counts),
                         **terms)

    def _perturbed(self, memory, std: float, active: torch.Tensor | None):
        """``memory`` with its training noise, on the samples whose segment was ``active`` (all: None)."""
        if self.memory_config.associative:
            perturbed = associative.perturb(memory, std)
            return perturbed if active is None else perturbed.where(active, memory)
        perturbed = perturb(memory, std)
        return perturbed if active is None else torch.where(active, perturbed, memory)

    def _carried(self, new_memory, memory, clean, seg_mask):
        """(the memory the next segment reads, which samples the segment held: None without padding).
        A sample whose segment is all padding has ended (or not begun): its memory stays as it was
        (``clean``), without training noise, so it neither drifts nor adds to the stability loss."""
        if seg_mask is None:
            return new_memory.to(memory.dtype), None
        active = seg_mask.bool().any(dim=1)
        if self.memory_config.associative:
            return new_memory.where(active, clean), active
        active = active[:, None, None]
        return torch.where(active, new_memory.to(memory.dtype), clean), active

    # -- inference ------------------------------------------------------------------------
    @torch.no_grad()
    def read(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             memory: torch.Tensor | None = None) -> torch.Tensor:
        """The memory after reading ``input_ids``, without gradients or logits (inside an autocast to
        the backbone's own dtype, as without it: ``_own_precision``)."""
        with self._own_precision():
            return self.forward(input_ids, attention_mask, memory=memory, return_logits=False).memory

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 memory: torch.Tensor | None = None, **generate_kwargs):
        """Read every segment but the last into memory, then ``generate`` from the last segment
        behind the read-memory prefix. Returns what the backbone's ``generate`` returns with
        ``inputs_embeds``: only the new tokens (or a ``GenerateOutput`` with scores when asked).
        Batches should be left-padded (pair with segment_alignment="right").

        ``memory`` (batch or 1, num_memory_tokens, hidden), or an ``AssociativeState`` of 1 or
        batch samples, continues from an earlier state instead
        of the learned initial memory: read a document once with ``rmt.read(document)``, a
        ``MemoryStream`` or ``MemoryState.load_for``, then ask many questions. With left
        alignment, ``generate(question, memory=rmt.read(document))`` gives the same tokens and
        scores as ``generate(document + question)`` when the document is a whole number of segments.
        """
        self.check_inputs(input_ids, attention_mask)
        cfg = self.memory_config
        bounds = segment_bounds(input_ids.shape[1], cfg.segment_size, cfg.segment_alignment)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        last = bounds[-1][0]
        memory = self._start_memory(memory, input_ids.shape[0])
        if last > 0:
            memory = self.read(input_ids[:, :last], attention_mask[:, :last], memory=memory)
        ids, mask = input_ids[:, last:], attention_mask[:, last:]
        embeds = self.causal_lm.get_input_embeddings()(ids)
        m = cfg.num_memory_tokens
        if m and not cfg.associative:
            embeds = torch.cat([(memory + self.memory.read_embedding).to(embeds.dtype), embeds], dim=1)
            mask = torch.cat([mask.new_ones(mask.shape[0], m), mask], dim=1)
        new_tokens = generate_kwargs.get("max_new_tokens")
        if new_tokens is not None:
            check_position_limit(self.causal_lm.config, cfg, extra=new_tokens, used=embeds.shape[1])
        if cfg.associative:  # every generated position reads the memory; nothing is written
            with self.memory.associative.session(memory):
                return self.causal_lm.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)
        return self.causal_lm.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)

    def _start_memory(self, memory, batch: int):
        """The memory a read starts from: the learned initial one, or ``memory`` (a batch of one
        serves every sample) on the parameters' device and dtype."""
        if memory is None:
            return self.initial_memory(batch)
        if self.memory_config.associative:
            self._check_state(memory, batch)
            return memory.to(self.memory.memory_tokens.device).expand(batch)
        expected = (self.memory_config.num_memory_tokens, self.memory.memory_tokens.shape[1])
        if memory.dim() != 3 or tuple(memory.shape[1:]) != expected or memory.shape[0] not in (1, batch):
            raise UserError(f"memory of shape {tuple(memory.shape)} does not fit this model: expected "
                            f"(1 or {batch}, {expected[0]}, {expected[1]}) = (batch, num_memory_tokens, hidden)")
        if not bool(torch.isfinite(memory).all()):
            raise ValueError("memory holds NaN or infinite values; it would make every output NaN (was it read by a "
                             "model that diverged?)")
        reference = self.memory.memory_tokens
        return memory.to(reference.device, reference.dtype).expand(batch, -1, -1)

    def stream(self, batch_size: int = 1, compute_loss: bool = False,
               return_logits: bool = False, cuda_graph: bool | None = None,
               merge_lora: bool | None = None) -> "MemoryStream":
        """A reader for inputs of any length arriving in chunks (see ``MemoryStream``).
        ``cuda_graph`` replays each full segment as a CUDA graph (``speedups.SegmentGraph``): True
        from the first segment on; None (default) in eval mode on a CUDA GPU from segment 17 on, when
        ``speedups.graph_blocker`` finds nothing against it (compiled blocks, bitsandbytes layers
        computing themselves; logged), so short streams never pay for a capture.
        ``merge_lora``: with LoRA attached, the stream multiplies with merged copies of the
        weights (``speedups.merged_lora_view``): the speed of a merged model, the model itself
        unchanged, values as ``merge_and_unload`` rounds them. None (default): on for a model in
        eval mode on a CUDA GPU when the copies take at most a tenth of its memory
        (``speedups.merge_pays``; logged). In eval mode the copies are kept for the next stream
        until the weights change or ``train()`` is called."""
        return MemoryStream(self, batch_size, compute_loss, return_logits, cuda_graph, merge_lora)


@dataclass
class StreamResult:
    """The state after a stream: final memory, tokens and segments read, and with
    ``compute_loss`` the mean token loss and each segment's loss (empty without it)."""

    memory: torch.Tensor
    num_tokens: int
    num_segments: int
    loss: float | None
    segment_losses: list[float]


class MemoryStream:
    """Push token chunks of any size; full segments are read as soon as they are complete.

    Holds at most one segment (plus one look-ahead token, the target of the segment's last
    position) and the memory, so the cost is constant in the input length. It computes the same
    memory, loss and logits as ``RMTModel.forward`` on the concatenated input (left alignment,
    no padding). ``feed`` returns the logits of the segments it completed when asked for.
    With ``merge_lora`` it reads through merged copies of the LoRA layers' weights, inside its own
    calls only (values then as a merged model rounds them); the model keeps the copies for the
    next stream while it stays in eval mode with the same weights (``RMTModel._stream_view``).
    """

    def __init__(self, model: RMTModel, batch_size: int = 1, compute_loss: bool = False,
                 return_logits: bool = False, cuda_graph: bool | None = None, merge_lora: bool | None = None):
        self.model = model
        self._view = model._stream_view(merge_lora)
        self._graph, self._graph_from = None, 0  # the segment index the graph serves from
        if cuda_graph is None:
            cuda_graph, why = graph_pays(model, self._view.copies)
            model._note_stream_default("with CUDA graphs", why, "cuda_graph")
            self._graph_from = GRAPH_AFTER_SEGMENTS
        if cuda_graph:
            self._graph = SegmentGraph(model)
        self.compute_loss = compute_loss
        self.return_logits = return_logits
        self.memory = model.initial_memory(batch_size).detach()
        self.size = model.memory_config.segment_size
        self._ids: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._buffered = 0
        self.num_tokens = 0
        self.segment_losses: list[float] = []
        self._loss_sum = 0.0
        self._count = 0
        self._segments = 0
        self._all_labelled = True
        self._pending: list[torch.Tensor] = []  # (loss sum, count) per segment, still on the device

    def feed(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Add (batch, n) tokens; labels default to the tokens themselves (language modelling). A bad
        chunk (not a tensor of integer ids in the vocabulary, another batch size) is a ValueError naming
        the argument, checked once per call (one sync), not per segment."""
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if isinstance(labels, torch.Tensor) and labels.dim() == 1:
            labels = labels.unsqueeze(0)
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] == 0:
            return []  # an empty chunk: nothing to read
        self.model.check_inputs(input_ids, labels=labels)
        if input_ids.shape[0] != self.batch_size:
            raise ValueError(f"input_ids has a batch of {input_ids.shape[0]}, but this stream reads a batch of "
                             f"{self.batch_size} (rmt.stream(batch_size=...))")
        if labels is None:
            labels = input_ids
        else:
            self._all_labelled = False  # labels may hold IGNORE_INDEX: count them on the device
        self._ids.append(input_ids)
        self._labels.append(labels)
        self._buffered += input_ids.shape[1]
        self.num_tokens += input_ids.shape[1]
        out = []
        while self._buffered > self.size:  # one token more than a segment: the look-ahead target
            out += self._run(self.size)
        return out

    def finish(self) -> StreamResult:
        """Read what is left (a short last segment) and return the final state."""
        if self._buffered:
            self._run(self._buffered, last=True)
        self._collect()
        loss = self._loss_sum / self._count if self.compute_loss and self._count else None
        return StreamResult(self.memory, self.num_tokens, self._segments, loss, list(self.segment_losses))

    @property
    def batch_size(self) -> int:
        memory = self.memory
        return memory.batch_size if isinstance(memory, AssociativeState) else memory.shape[0]

    @property
    def pending(self) -> torch.Tensor:
        """The tokens fed but not read yet (at most one segment): the start of the next segment."""
        if not self._ids:
            return torch.zeros(self.batch_size, 0, dtype=torch.long, device=self.model.memory.memory_tokens.device)
        return torch.cat(self._ids, dim=1)

    def generate(self, input_ids: torch.Tensor, **generate_kwargs):
        """Generate after what was fed, without reading it again: ``rmt.generate`` on the pending
        tokens + ``input_ids`` from the stream's memory, which gives the same tokens and scores as
        ``rmt.generate(everything fed + input_ids)`` (left alignment). The stream is unchanged."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        ids = torch.cat([self.pending.to(input_ids.device), input_ids], dim=1)
        return self.model.generate(ids, memory=self.memory, **generate_kwargs)

    def _collect(self) -> None:
        """Bring pending segment losses to the host: one sync per batch of segments, not per segment."""
        if not self._pending:
            return
        for loss_sum, count in torch.stack(self._pending).tolist():
            self.segment_losses.append(loss_sum / count if count else float("nan"))
            self._loss_sum += loss_sum
            self._count += int(count)
        self._pending = []

    @torch.no_grad()
    def _run(self, n: int, last: bool = False) -> list[torch.Tensor]:
        ids, labels = torch.cat(self._ids, dim=1), torch.cat(self._labels, dim=1)
        targets = None
        if self.compute_loss:
            targets = labels[:, 1:n + 1]
            if last:
                targets = torch.cat([targets, targets.new_full((targets.shape[0], 1), IGNORE_INDEX)], dim=1)
        seg = ids[:, :n]
        num_labelled = None
        if targets is not None and self._all_labelled:
            num_labelled = targets.numel() - (targets.shape[0] if last else 0)
        eager = self._graph is None or last or self._segments < self._graph_from  # last: a short one
        segment = self.model._segment if eager else self._graph
        with self._view, self.model._own_precision():
            new_memory, loss_sum, count, logits = segment(self.memory, seg, None, targets, self.return_logits,
                                                          num_labelled)
        self.memory = new_memory.to(self.memory.dtype)
        self._ids, self._labels = [ids[:, n:]], [labels[:, n:]]
        self._buffered -= n
        self._segments += 1
        if self.compute_loss:
            self._pending.append(torch.stack([loss_sum.double(), count.double()]))
            if len(self._pending) >= 64:
                self._collect()
        return [logits] if logits is not None else []


def stream_tokens(model: RMTModel, chunks: Iterable[torch.Tensor], compute_loss: bool = False) -> StreamResult:
    """Read an iterable of token chunks (each (batch, n) or (n,)) and return the final state."""
    reader = model.stream(compute_loss=compute_loss)
    for chunk in chunks:
        reader.feed(chunk)
    return reader.finish()
