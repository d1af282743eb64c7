"""Recipes: one YAML file describes a whole run; this module loads, overrides and validates it.

Sections (each a dataclass below): ``model``, ``memory`` (``MemoryConfig`` fields), ``lora``
(a preset name or ``peft.LoraConfig`` fields; null fine-tunes the whole, unquantized, backbone), ``data`` (a task of
``rmt_peft.data.registry`` and its options), ``curriculum`` (stages by number of segments),
``training`` (``transformers.TrainingArguments`` fields, verbatim), ``eval`` and ``guard`` (what a
diverging run does).

``load_recipe(path, overrides)`` applies ``dotted.key=value`` overrides (values parsed as YAML)
and validates everything that can be checked without loading weights: unknown keys, wrong
types, values out of range and impossible combinations (a segment plus its memory that does not
fit the model's learned positions, read from config.json only; ZeRO-3 with 8-bit weights; ...).
Every error is a ``RecipeError`` naming the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import psutil
import torch
import yaml
from huggingface_hub.errors import StrictDataclassError  # transformers configs validate their fields
from transformers import AutoConfig, TrainingArguments
from transformers.integrations import get_available_reporting_integrations
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

from . import resources
from .adapters import PRESETS as LORA_PRESETS
from .backbones import DTYPES as TORCH_DTYPES
from .backbones import position_limit
from .data import registry
from .data.tokenizer import offline_tokenizer
from .errors import RecipeError, UserError  # RecipeError: re-exported, the recipe's error
from .fileio import check_writable
from .memory import MemoryConfig
from .quantization import BACKENDS, QUANTIZATIONS
from .runs import FINAL_DIR, RUN_SUMMARY_FILE
from .speedups import COMPILE_SCOPES, CUDA_GRAPH_MODES
from .tiny_models import ARCHITECTURES, TINY_PREFIX, tiny_config
from .training_args import UNSUPPORTED, TrainingKeys, owned, read_deepspeed_config, resolve_deepspeed

DTYPES = (None, *TORCH_DTYPES)  # null: the checkpoint's own
ATTENTIONS = (None, "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TRAINERS = ("rmt", "sft")
ON_DIVERGENCE = ("stop", "rollback")
# what the curriculum's stages can be decided on: the evaluations during training report these
CURRICULUM_METRICS = ("eval_loss", "eval_accuracy")
TRAINING_POSITIVE = ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "logging_steps", "save_steps", "eval_steps")
TRAINING_NON_NEGATIVE = ("weight_decay", "max_grad_norm", "warmup_steps", "warmup_ratio", "save_total_limit",
                         "dataloader_num_workers")
INSTRUCTION_TASK = "instruction"  # trainer: sft; data.options are datasets.load_dataset arguments
# Why compiled blocks are off under ZeRO-3: measured on 2 x H200 (GPT-Neo-1.3B shape, issue 15), the run
# never got past its first steps in 200 s.
ZERO3_NO_COMPILE = ("DeepSpeed ZeRO-3 gathers each module's weights in per-module hooks, on which torch.compile "
                    "recompiles until it hits torch._dynamo's recompile limit, and the run crawls")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise RecipeError(message)


# -- sections: each checks its own values (__post_init__); validate() checks what spans sections --
@dataclass
class ModelSection:
    """name_or_path: a Hub id, a local folder, or ``tiny:<arch>`` (a random tiny model built from
    a config, offline; ``config`` holds its ``rmt_peft.tiny_models.tiny_config`` arguments).
    tokenizer: a Hub id or folder, ``offline`` (the data package's offline tokenizer), or None:
    the model's own tokenizer (tiny models: the offline one, when the task needs a tokenizer).
    speedups: the exact speed-ups (same outputs): SDPA attention for GPT-Neo (unless ``attention``
    names another), GPT-Neo / GPT-2's eight-kernel GELU as one kernel, the LM head padded to a
    multiple of 64 rows on CUDA; false keeps the model as transformers computes it.
    compile_blocks: ``torch.compile`` each decoder block; null (default) = on when a CUDA GPU is
    present, where RMT's many short forwards are launch-bound (1.7-2.5x, BENCHMARKS.md), off on
    the CPU (compiling costs more than it saves on tiny models) and under DeepSpeed ZeRO-3
    (``ZERO3_NO_COMPILE``; ``Recipe.compiles_blocks`` resolves it). compile_mode:
    torch.compile's mode for the blocks (None = its default; "reduce-overhead" also captures
    CUDA graphs for training steps, +4-36% on NF4 backbones in BENCHMARKS.md; evaluation runs
    the blocks eagerly then). compile_scope: what is compiled, "blocks" (default: each decoder
    block, one graph shared by every layer) or "body" (the decoder stack whole, one compiled
    call a segment: a faster step where the host is the bottleneck, a longer compile per new
    shape; ``rmt_peft.speedups.compile_body``). compile_memory_budget: in (0, 1], the share of
    the activations each compiled graph keeps for backward; below 1 it recomputes the rest,
    cheapest first (torch's ``activation_memory_budget``): smaller segments at less recompute
    than checkpointing whole segments. null (default): 1, lowered by
    ``memory.checkpoint_segments: auto`` when whole segments would be recomputed.
    cache_dequantized_weights: 4-bit backbones keep each weight
    dequantized in the compute dtype instead of dequantizing it on every call (same values;
    2 bytes per weight more memory; ``rmt_peft.speedups.cache_dequantized_weights``); null
    (default) = on where the copies take at most a tenth of the GPU's memory
    (``speedups.cache_pays``), never on the CPU or under ZeRO-3.
    quantization: null (the dtype's full precision), "8bit", "4bit" or "fp8" (e4m3 weights,
    matmuls at FP8 rate; CUDA GPUs with FP8 tensor cores only). quantization_backend: which
    library holds the quantized weights: "bitsandbytes" (LLM.int8 / NF4, the paper's),
    "torch" (weights stay int8 / NF4 / e4m3 and each compiled matmul dequantizes them: about
    bf16 speed without bf16 copies; ``rmt_peft.quantized_linear``), or "auto" (default): torch
    on a CUDA GPU, bitsandbytes on the CPU, under DeepSpeed and with cache_dequantized_weights
    (logged; ``quantization.choose_backend``). quantize_embeddings: with the torch backend, the
    token embeddings and the LM head are held in int8 too (one scale a row; a tied head shares
    the table; ``rmt_peft.quantized_embedding``); false keeps them in ``dtype``, as bitsandbytes
    does. It has no effect with bitsandbytes."""

    name_or_path: str = ""
    quantization: str | None = None
    quantization_backend: str = "auto"
    quantize_embeddings: bool = True
    dtype: str | None = None
    attention: str | None = None
    config: dict = field(default_factory=dict)
    tokenizer: str | None = None
    speedups: bool = True
    compile_blocks: bool | None = None
    compile_mode: str | None = None
    compile_scope: str = "blocks"
    compile_memory_budget: float | None = None
    cache_dequantized_weights: bool | None = None

    def __post_init__(self) -> None:
        _need(bool(self.name_or_path), "model.name_or_path is required (a Hub id, a folder, or tiny:<arch>)")
        _need(self.quantization in QUANTIZATIONS,
              f"model.quantization={self.quantization!r} is not allowed; allowed: {list(QUANTIZATIONS)}")
        _need(self.dtype in DTYPES, f"model.dtype={self.dtype!r} is not allowed; allowed: {list(DTYPES)}")
        _need(self.compile_mode in COMPILE_MODES,
              f"model.compile_mode={self.compile_mode!r} is not allowed; allowed: {list(COMPILE_MODES)}")
        _need(self.compile_scope in COMPILE_SCOPES,
              f"model.compile_scope={self.compile_scope!r} is not allowed; allowed: {list(COMPILE_SCOPES)}")
        budget = self.compile_memory_budget
        _need(budget is None or (isinstance(budget, (int, float)) and not isinstance(budget, bool) and 0 < budget <= 1),
              f"model.compile_memory_budget={budget!r} is invalid: expected null or a number in (0, 1] (1 = keep "
              "every activation)")
        _need(budget is None or self.compile_blocks is not False,
              f"model.compile_memory_budget={budget!r} needs model.compile_blocks=true (or null: on a GPU)")
        _need(self.compile_scope == "blocks" or self.compile_blocks is not False,
              f"model.compile_scope={self.compile_scope!r} needs model.compile_blocks=true (or null: on a GPU)")
        _need(self.compile_mode is None or self.compile_blocks is not False,
              f"model.compile_mode={self.compile_mode!r} needs model.compile_blocks=true (or null: on a GPU)")
        _need(self.quantization_backend in BACKENDS,
              f"model.quantization_backend={self.quantization_backend!r} is not allowed; allowed: {list(BACKENDS)}")
        _need(not (self.quantization == "fp8" and self.quantization_backend == "bitsandbytes"),
              "model.quantization='fp8' is held by torch, not bitsandbytes; allowed model.quantization_backend: "
              "['auto', 'torch']")
        _need(not self.cache_dequantized_weights or self.quantization == "4bit",
              f"model.cache_dequantized_weights=true needs model.quantization='4bit' (got {self.quantization!r})")
        _need(not self.cache_dequantized_weights or self.quantization_backend != "torch",
              "model.cache_dequantized_weights=true keeps copies of bitsandbytes' 4-bit weights; with "
              "model.quantization_backend='torch' there are none to keep (use 'bitsandbytes' or 'auto')")
        _need(self.attention in ATTENTIONS,
              f"model.attention={self.attention!r} is not allowed; allowed: {list(ATTENTIONS)}")

    @property
    def is_tiny(self) -> bool:
        return self.name_or_path.startswith(TINY_PREFIX)


@dataclass
class DataSection:
    """task: a name in ``rmt_peft.data.registry.TASKS``; options: that task's options.
    format: "tokens" (the registry's tokenized samples, trained by the RMT engine) or
    "prompt_completion" / "messages" (instruction data trained through trl's SFTTrainer)."""

    task: str = ""
    options: dict = field(default_factory=dict)
    num_train_samples: int = 1000
    num_eval_samples: int = 100
    seed: int = 0
    padding_side: str = "right"

    def __post_init__(self) -> None:
        _need(self.padding_side in ("left", "right"),
              f"data.padding_side={self.padding_side!r} is not allowed; allowed: ['left', 'right']")
        for name in ("num_train_samples", "num_eval_samples"):
            _need(getattr(self, name) >= 1, f"data.{name}={getattr(self, name)} must be >= 1")


@dataclass
class Stage:
    """One curriculum stage. num_segments: an int, or a list to mix segment counts inside the
    stage (samples of every listed count, shuffled together). max_steps: the stage's optimizer
    step budget. The stage also ends early when ``metric`` reaches ``threshold`` or stops
    improving by ``min_delta`` for ``patience`` evaluations (either may be left out)."""

    num_segments: int | list[int] = 1
    max_steps: int | None = None
    metric: str | None = None
    threshold: float | None = None
    patience: int | None = None
    min_delta: float = 0.0


@dataclass
class CurriculumSection:
    """stages: explicit stages, or ``segments`` ([1, 2, 3]) expanded to one stage per count with
    the defaults below. mix_previous: in each expanded stage also train on the earlier counts.
    levers_from_stage: the first stage (0-based) that trains with the memory's stability loss,
    training noise and associative write cost (``memory.memory_stability_weight``,
    ``memory.memory_noise_std``, ``memory.associative_write_cost``); the stages before it train
    with them off, so the memory first learns to write facts that arrive anywhere
    in the input (from the start, the stability loss holds such writes back; docs/memory-model.md).
    keep_best_segments: from stage ``keep_best_from_stage`` (default: levers_from_stage) on, each
    evaluation during training also scores the weights by answer accuracy on ``keep_best_samples``
    held-out samples of this many segments; the best (latest among ties) go to OUTPUT_DIR/best/
    and become final/ (train/keep_best.py). null: final/ holds the last weights."""

    segments: list[int] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    steps_per_stage: int | None = None
    mix_previous: bool = False
    levers_from_stage: int = 0
    keep_best_segments: int | None = None
    keep_best_samples: int = 128
    keep_best_from_stage: int | None = None
    metric: str | None = None
    threshold: float | None = None
    patience: int | None = None
    min_delta: float = 0.0


@dataclass
class EvalSection:
    """num_segments: the input lengths (in segments) of the final evaluation.
    baseline: also train the same recipe with 0 memory tokens and report both."""

    num_segments: list[int] = field(default_factory=list)
    num_samples: int | None = None
    batch_size: int | None = None
    baseline: bool = False

    def __post_init__(self) -> None:
        for n in self.num_segments:
            _need(n >= 1, f"eval.num_segments contains {n}; expected integers >= 1")
        for name in ("num_samples", "batch_size"):
            value = getattr(self, name)
            _need(value is None or value >= 1, f"eval.{name}={value} must be >= 1 (or null: the default)")


@dataclass
class GuardSection:
    """The divergence guard (rmt_peft/train/guard.py): a non-finite loss or gradient norm, or a
    gradient norm above spike_factor x its running level for spike_steps optimizer steps in a row,
    is a divergence. on_divergence: "stop" (the run ends with TrainingDiverged, summary.json says
    status diverged) or "rollback" (the stage resumes from its last good checkpoint, or its start,
    with the learning rate times rollback_lr_factor; at most max_rollbacks times, then stop).
    spike_factor: null checks only for non-finite values. spike_steps: 100 (DivergenceGuard's
    default), not 20: on memory tasks at a loss of about 0, 20 would have stopped 24 of 147
    learning-benchmark runs that trained to the end, 23 of them well (docs/training.md)."""

    on_divergence: str = "stop"
    spike_factor: float | None = 20.0
    spike_steps: int = 100
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3

    def __post_init__(self) -> None:
        _need(self.on_divergence in ON_DIVERGENCE,
              f"guard.on_divergence={self.on_divergence!r} is not allowed; allowed: {list(ON_DIVERGENCE)}")
        _need(self.spike_factor is None or self.spike_factor > 1,
              f"guard.spike_factor={self.spike_factor!r} must be > 1 (or null: check only for NaN / inf)")
        _need(self.spike_steps >= 1, f"guard.spike_steps={self.spike_steps} must be >= 1")
        _need(0 < self.rollback_lr_factor < 1, f"guard.rollback_lr_factor={self.rollback_lr_factor} must be in (0, 1)")
        _need(self.max_rollbacks >= 0, f"guard.max_rollbacks={self.max_rollbacks} must be >= 0")


@dataclass
class Recipe:
    model: ModelSection
    memory: MemoryConfig
    lora: str | dict | None
    data: DataSection
    curriculum: CurriculumSection
    training: dict
    eval: EvalSection
    trainer: str = "rmt"
    guard: GuardSection = field(default_factory=GuardSection)
    source: str | None = None   # the file it came from
    _deepspeed: tuple | None = field(default=None, init=False, repr=False, compare=False)  # (value, config read)

    def to_dict(self) -> dict[str, Any]:
        out = {name: _plain(getattr(self, name)) for name in SECTIONS}
        out["trainer"] = self.trainer
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def output_dir(self) -> str:
        return self.training["output_dir"]

    @property
    def keys(self) -> TrainingKeys:
        """The training keys the engine reads, typed: a view of ``training`` as it is now; the DeepSpeed
        config it names is read once (again only when ``training.deepspeed`` changes)."""
        value = self.training.get("deepspeed")
        if self._deepspeed is None or self._deepspeed[0] != value:
            self._deepspeed = (value, read_deepspeed_config(value))
        return TrainingKeys.of(self.training, self._deepspeed[1])

    @property
    def deepspeed_config(self) -> dict | None:
        return self.keys.deepspeed_config

    @property
    def zero_stage(self) -> int:
        return self.keys.zero_stage

    @property
    def compiles_blocks(self) -> bool:
        """model.compile_blocks, with null resolved: on where a CUDA GPU is present, except under
        ZeRO-3 (``ZERO3_NO_COMPILE``; an explicit true with ZeRO-3 fails validation)."""
        if self.model.compile_blocks is None:
            return torch.cuda.is_available() and self.zero_stage != 3
        return self.model.compile_blocks


SECTIONS = ("model", "memory", "lora", "data", "curriculum", "training", "eval", "guard")
SECTION_TYPES = {"model": ModelSection, "memory": MemoryConfig, "data": DataSection,
                 "curriculum": CurriculumSection, "eval": EvalSection, "guard": GuardSection}


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# -- type checking --------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """``value`` checked (and, for numbers YAML left as strings like ``1e-4``, converted) to ``tp``."""
    if isinstance(tp, str):  # a forward reference from __future__ annotations
        tp = eval(tp, {**vars(typing), "Stage": Stage, "Any": Any})  # noqa: S307 - our own annotations
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except RecipeError:
                continue
        raise RecipeError(f"{key}={value!r} has the wrong type; allowed: {_type_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise RecipeError(f"{key}={value!r}: expected null")
        return None
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}={value!r} has the wrong type; allowed: {_type_name(tp)}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}={value!r} has the wrong type; allowed: a mapping")
        return value
    if isinstance(tp, type) and issubclass(tp, Enum):
        allowed = [m.value for m in tp]
        if value not in allowed:
            raise RecipeError(f"{key}={value!r} is not allowed; allowed: {allowed}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}={value!r} has the wrong type; allowed: true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}={value!r} has the wrong type; allowed: an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-4 as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}={value!r} has the wrong type; allowed: a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}={value!r} has the wrong type; allowed: a string")
        return value
    return value


def build_section(cls, values, key: str):
    """An instance of dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"{key} must be a mapping of {cls.__name__} fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise RecipeError(f"unknown key(s) {[f'{key}.{u}' for u in unknown]}; allowed in {key}: {allowed}")
    typed = {name: _coerce(value, hints[name], f"{key}.{name}") for name, value in values.items()}
    try:
        return cls(**typed)
    except RecipeError:  # a section's own check (__post_init__): its message names the key already
        raise
    except (ValueError, TypeError) as err:
        # the section's own check names the field as ClassName.field: name it as the recipe key
        raise RecipeError(str(err).replace(f"{cls.__name__}.", f"{key}.")) from err


def check_training(values, trainer: str = "rmt") -> dict:
    """``training``: TrainingArguments fields verbatim (trl's SFTConfig fields with ``trainer: sft``);
    names and types are checked here, the values TrainingArguments checks itself when the run starts."""
    config_class = TrainingArguments
    if trainer == "sft":  # trl: imported only for the recipes that use it
        from trl import SFTConfig as config_class
    name_ = config_class.__name__
    if not isinstance(values, dict):
        raise RecipeError(f"training must be a mapping of {name_} fields, got {values!r}")
    fields_ = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    unknown = sorted(set(values) - set(fields_))
    if unknown:
        raise RecipeError(f"unknown key(s) {[f'training.{u}' for u in unknown]}: not {name_} fields "
                          f"(see {config_class.__module__.split('.')[0]}.{name_})")
    refused = {name: rule.why for name, rule in owned(trainer).items() if not rule.settable}
    out = {}
    for name, value in values.items():
        if name in refused:
            raise RecipeError(f"training.{name} cannot be set: {refused[name]}")
        if name in UNSUPPORTED and (value or name == "num_train_epochs"):
            raise RecipeError(f"training.{name}={value!r} is not supported: {UNSUPPORTED[name]}")
        if name == "resume_from_checkpoint" and isinstance(value, bool):
            out[name] = value  # true: the latest checkpoint in output_dir
            continue
        tp = fields_[name].type
        out[name] = _coerce(value, _training_type(tp), f"training.{name}")
    check_report_to(out.get("report_to"))
    if not out.get("output_dir"):
        raise RecipeError(f"training.output_dir is required: the folder of checkpoints, {FINAL_DIR}/ and "
                          f"{RUN_SUMMARY_FILE}")
    for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        kwargs = out.get(name) or {}
        _need(not (isinstance(kwargs, dict) and kwargs.get("use_reentrant") is True),
              f"training.{name}.use_reentrant=true is not allowed: BPTT reuses the LoRA weights in every segment "
              f"and reentrant checkpointing fires their gradient hooks once per use; only false is allowed")
    _need(not (out.get("bf16") and out.get("fp16")), "training.bf16 and training.fp16 are both true; pick one")
    # values TrainingArguments would accept but that cannot train (checked here, not mid-run)
    for name in TRAINING_POSITIVE:
        value = out.get(name)
        _need(value is None or 0 < value < math.inf, f"training.{name}={value!r} must be a finite number > 0")
    max_steps = out.get("max_steps")
    _need(max_steps is None or max_steps >= 1,
          f"training.max_steps={max_steps!r} must be an integer >= 1 (the cap on all stages together); leave it out "
          f"for no cap")
    for name in TRAINING_NON_NEGATIVE:
        value = out.get(name)
        _need(value is None or 0 <= value < math.inf, f"training.{name}={value!r} must be a finite number >= 0")
    output_dir = out["output_dir"]
    _need(not os.path.isfile(output_dir), f"training.output_dir={output_dir!r} is a file; expected a folder")
    try:
        check_writable(output_dir, "training.output_dir")
    except UserError as err:
        raise RecipeError(str(err)) from None
    if out.get("deepspeed") is not None:  # a shipped name becomes its file: what the Trainer and recipe.yaml get
        out["deepspeed"] = resolve_deepspeed(out["deepspeed"])
    return out


def check_report_to(value) -> None:
    """Every ``training.report_to`` integration must be one transformers knows and installed here
    (the Trainer would fail at start); "all" and "none" are always fine."""
    if value in (None, "all", "none", ["all"], ["none"]):
        return
    for name in [value] if isinstance(value, str) else value:
        if name not in INTEGRATION_TO_CALLBACK:
            raise RecipeError(f"training.report_to: {name!r} is not an integration transformers knows; allowed: "
                              f"{sorted(INTEGRATION_TO_CALLBACK) + ['all', 'none']}")
        if name not in get_available_reporting_integrations():
            raise RecipeError(f"training.report_to: {name!r} is not installed here (pip install {name}); "
                              f"installed: {get_available_reporting_integrations()}, or 'none'")


def _training_type(tp):
    """TrainingArguments annotates enums as ``Enum | str``: accept only the enum's values."""
    args = typing.get_args(tp)
    enums = [a for a in args if isinstance(a, type) and issubclass(a, Enum)]
    return enums[0] if enums else tp


# -- loading --------------------------------------------------------------------------------
def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set ``dotted.key=value`` pairs in ``raw`` (values parsed as YAML: 1e-4 -> number, [1,2] -> list)."""
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form dotted.key=value")
        key, text = item.split("=", 1)
        try:
            value = safe_load(text) if text != "" else None
        except yaml.YAMLError as err:
            raise RecipeError(f"override {key}: value {text!r} is not YAML: {' '.join(str(err).split())}") from err
        parts = key.strip().split(".")
        if parts[0] not in SECTIONS + ("trainer",):
            raise RecipeError(f"override {key!r}: unknown section {parts[0]!r}; allowed: {list(SECTIONS) + ['trainer']}")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None or not isinstance(child, dict):
                if child is not None:
                    raise RecipeError(f"override {key!r}: {'.'.join(parts[:depth + 1])} is {child!r}, not a mapping")
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return raw


def resolve_recipe(path: str) -> str:
    """``path`` when it exists, else the shipped recipe it names (``quickstart``, ``recipes/quickstart.yaml``)."""
    if os.path.exists(path):
        return path
    shipped = resources.recipe_path(path)
    if shipped is None:
        raise RecipeError(f"recipe file {path!r} does not exist; give a YAML file or a shipped recipe: "
                          f"{resources.names(resources.RECIPES)} (rmt-peft recipes)")
    return shipped


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def safe_load(text_or_stream):
    """yaml.safe_load, refusing duplicate keys (``UniqueKeyLoader``)."""
    return yaml.load(text_or_stream, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str) -> dict:
    path = resolve_recipe(path)
    if os.path.isdir(path):
        raise RecipeError(f"recipe {path!r} is a folder; expected a YAML file")
    try:
        with open(path, encoding="utf-8") as f:
            raw = safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        message = " ".join(str(err).split())
        raise RecipeError(f"recipe file {path!r} is not valid YAML: {message}") from err
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe file {path!r} must hold a mapping with sections {list(SECTIONS)}, "
                          f"got {type(raw).__name__}")
    return raw


def load_recipe(path: str, overrides: list[str] | None = None, check_files: bool = True) -> Recipe:
    """Read, override and validate a recipe (no model weights are loaded)."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    recipe = recipe_from_dict(raw, check_files=check_files)
    recipe.source = path
    return recipe


def recipe_from_dict(raw: dict, check_files: bool = True) -> Recipe:
    unknown = sorted(set(raw) - set(SECTIONS) - {"trainer"})
    if unknown:
        raise RecipeError(f"unknown section(s) {unknown}; allowed: {list(SECTIONS) + ['trainer']}")
    for required in ("model", "data", "training"):
        if not raw.get(required):
            raise RecipeError(f"section {required!r} is required")
    curriculum = raw.get("curriculum")
    if isinstance(curriculum, dict) and not curriculum.get("segments") and not curriculum.get("stages"):
        for key in ("segments", "stages"):  # given, but empty (a resolved recipe.yaml lists stages, segments: [])
            _need(curriculum.get(key, None) != [],
                  f"curriculum.{key}=[] has no stage; give at least one (e.g. segments: [1, 2, 4]), or leave "
                  f"curriculum out for one stage of 1 segment")
    sections = {name: build_section(cls, raw.get(name), name) for name, cls in SECTION_TYPES.items()}
    lora = raw.get("lora")
    if lora is not None and not isinstance(lora, (str, dict)):
        raise RecipeError(f"lora={lora!r}: expected a preset name, a mapping of peft LoraConfig fields, or null")
    trainer = raw.get("trainer", "rmt")
    if trainer not in TRAINERS:
        raise RecipeError(f"trainer={trainer!r} is not allowed; allowed: {list(TRAINERS)}")
    recipe = Recipe(lora=lora, training=check_training(raw["training"], trainer), trainer=trainer, **sections)
    recipe.curriculum = expand_curriculum(recipe.curriculum)
    validate(recipe, check_files=check_files)
    return recipe


def expand_curriculum(cur: CurriculumSection) -> CurriculumSection:
    """Turn the ``segments`` shorthand into stages and fill stage defaults from the section."""
    if cur.segments and cur.stages:
        raise RecipeError("curriculum: give either segments (shorthand) or stages, not both")
    stages = list(cur.stages)
    if cur.segments:
        stages = [Stage(num_segments=sorted(set(cur.segments[:i + 1])) if cur.mix_previous and i else n)
                  for i, n in enumerate(cur.segments)]
    if not stages:
        stages = [Stage(num_segments=1)]
    for stage in stages:
        for name in ("metric", "threshold", "patience"):
            if getattr(stage, name) is None:
                setattr(stage, name, getattr(cur, name))
        if stage.max_steps is None:
            stage.max_steps = cur.steps_per_stage
        if not stage.min_delta:
            stage.min_delta = cur.min_delta
    return dataclasses.replace(cur, segments=[], stages=stages)


# -- validation -----------------------------------------------------------------------------
def stage_segments(stage: Stage) -> list[int]:
    return stage.num_segments if isinstance(stage.num_segments, list) else [stage.num_segments]


def model_config(model: ModelSection):
    """The backbone's transformers config (config.json only; no weights), or None when it cannot
    be read here (a Hub id while offline): checks that need it are then left to load time."""
    if model.is_tiny:
        arch = model.name_or_path[len(TINY_PREFIX):]
        _need(arch in ARCHITECTURES, f"model.name_or_path={model.name_or_path!r}: unknown tiny architecture "
                                     f"{arch!r}; allowed: {[TINY_PREFIX + a for a in ARCHITECTURES]}")
        for key, value in model.config.items():
            _need(not isinstance(value, int) or isinstance(value, bool) or value >= 1,
                  f"model.config.{key}={value} must be an integer >= 1")
        # built in memory (tiny_models.py; model.dtype is applied): bitsandbytes quantizes while loading a checkpoint
        _need(model.quantization is None,
              f"model.quantization={model.quantization!r} is not applied to {model.name_or_path} (random weights built "
              f"from a config, not loaded); leave it out, or save the model (rmt_peft.tiny_models.save_tiny_model) "
              f"and give its folder in model.name_or_path")
        try:
            return tiny_config(arch, **model.config)
        except (TypeError, ValueError, StrictDataclassError) as err:
            raise RecipeError(f"model.config={model.config!r} is not valid for tiny_config: "
                              f"{' '.join(str(err).split())}") from err
    _need(not model.config, "model.config is only for tiny:<arch> models (a real model's config comes with it)")
    path = model.name_or_path
    looks_local = path.startswith((".", "/", "~")) or os.path.isabs(path) or path.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise RecipeError(f"model.name_or_path={path!r} does not exist (a local path); give an existing folder "
                          f"or a Hub id like 'EleutherAI/gpt-neo-125m'")
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(path))
    except (OSError, ValueError):
        if os.path.isdir(os.path.expanduser(path)):
            raise RecipeError(f"model.name_or_path={path!r} has no readable config.json") from None
        return None


def check_lora(recipe: Recipe) -> None:
    """``lora``: a preset, or fields of peft's LoraConfig with values training can use (peft itself
    accepts r=0 or a dropout of 2 and fails later, in the middle of building the model); null
    fine-tunes the whole backbone, which a quantized backbone cannot."""
    lora = recipe.lora
    if lora is None:
        _need(recipe.model.quantization is None,
              f"lora=null fine-tunes the whole backbone, but model.quantization={recipe.model.quantization!r} "
              f"freezes it (quantized weights do not train): give a LoRA preset ({list(LORA_PRESETS)}) or fields, or "
              f"set model.quantization=null")
        return
    if isinstance(lora, str):
        _need(lora in LORA_PRESETS, f"lora={lora!r} is not a preset; allowed: {list(LORA_PRESETS)}, a mapping of "
                               f"peft.LoraConfig fields, or null (fine-tune the whole backbone)")
        return
    from peft import LoraConfig

    fields_ = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    unknown = sorted(set(lora) - fields_)
    _need(not unknown, f"unknown key(s) {[f'lora.{u}' for u in unknown]}: not peft.LoraConfig fields")
    r, alpha, dropout = lora.get("r", 8), lora.get("lora_alpha", 16), lora.get("lora_dropout", 0.0)
    _need(isinstance(r, int) and not isinstance(r, bool) and r >= 1, f"lora.r={r!r} must be an integer >= 1")
    _need(isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha < math.inf,
          f"lora.lora_alpha={alpha!r} must be a finite number > 0")
    _need(isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1,
          f"lora.lora_dropout={dropout!r} must be a number in [0, 1)")
    _need(lora.get("bias", "none") in ("none", "all", "lora_only"),
          f"lora.bias={lora.get('bias')!r} is not allowed; allowed: ['none', 'all', 'lora_only']")
    targets = lora.get("target_modules", "attention")
    _need(isinstance(targets, str) and targets or isinstance(targets, list) and targets
          and all(isinstance(t, str) and t for t in targets),
          f"lora.target_modules={targets!r}: expected a preset {list(LORA_PRESETS)}, a regex, or a list of module names")
    try:
        LoraConfig(**{k: v for k, v in lora.items() if k != "target_modules"})
    except (TypeError, ValueError) as err:
        raise RecipeError(f"lora: peft.LoraConfig refuses it: {' '.join(str(err).split())}") from None


# int64 ids, attention mask and labels: what one sample of a stage or an evaluation holds
SAMPLE_BYTES_PER_TOKEN = 3 * 8


def check_sample_fits(num_segments: int, segment_size: int, key: str) -> None:
    """A RecipeError naming ``key`` when one sample of ``num_segments`` segments would not fit in the
    memory this machine has free: refused by arithmetic before anything is allocated."""
    per_segment = segment_size * SAMPLE_BYTES_PER_TOKEN
    need, free = num_segments * per_segment, psutil.virtual_memory().available
    _need(need <= free, f"{key}: {num_segments} segments of {segment_size} tokens make samples of "
                        f"{num_segments * segment_size:,} tokens, {need / 2**30:,.1f} GiB each, but this machine has "
                        f"{free / 2**30:,.1f} GiB free; allowed here: at most {free // per_segment:,} segments")


INSTRUCTION_FIELDS = (("text",), ("prompt", "completion"), ("messages",))  # what trl's SFTTrainer reads


def check_instruction_files(options: dict) -> None:
    """Local ``data_files`` of an instruction dataset exist and their first record has a field trl
    reads (``INSTRUCTION_FIELDS``): a file that is missing, empty, binary, not JSON or lacking those
    fields fails here, naming it, instead of inside datasets / trl once training starts."""
    builder, files = options.get("path"), options.get("data_files")
    if builder not in ("json", "csv", "text") or files is None:
        return
    if isinstance(files, dict):
        files = [f for value in files.values() for f in ([value] if isinstance(value, str) else value)]
    for pattern in [files] if isinstance(files, str) else files:
        _need(isinstance(pattern, str), f"data.options.data_files: {pattern!r} is not a file name")
        if "://" in pattern:
            continue  # a remote file: datasets reads it
        paths = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
        _need(bool(paths), f"data.options.data_files={pattern!r}: no file matches")
        for path in paths:
            _need(os.path.isfile(path), f"data.options.data_files: {path} is not a file")
            problem = first_record_problem(path, builder)
            _need(problem is None, f"data.options.data_files: {path}: {problem}")


def first_record_problem(path: str, builder: str) -> str | None:
    """Why the first record of a ``builder`` ("json", "csv", "text") file cannot train, or None."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip():
        return "empty"
    if b"\0" in head:
        return "binary (it holds NUL bytes), not text"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not a character cut at the end of the block read
            return f"not UTF-8 text (byte {err.start})"
        text = head[:err.start].decode("utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    wanted = " or ".join("+".join(f) for f in INSTRUCTION_FIELDS)
    if builder == "text":
        return None
    if builder == "csv":
        columns = {c.strip() for c in lines[0].split(",")}
        return None if any(set(f) <= columns for f in INSTRUCTION_FIELDS) else \
            f"its header {sorted(columns)} has no column {wanted}"
    if text.lstrip().startswith("["):  # a JSON array of records
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        except (ValueError, UnicodeDecodeError) as err:
            return f"not JSON ({err})"
        first = records[0] if isinstance(records, list) and records else None
    else:  # JSON lines
        try:
            first = json.loads(lines[0])
        except ValueError as err:
            return f"line 1 is not JSON ({err})"
    if not isinstance(first, dict):
        return f"the first record is {type(first).__name__}, not an object with {wanted}"
    if not any(set(f) <= set(first) for f in INSTRUCTION_FIELDS):
        return f"the first record has fields {sorted(first)}, none of {wanted} (what trl's SFTTrainer reads)"
    return None


def needs_tokenizer(recipe: Recipe) -> bool:
    return recipe.trainer == "sft" or registry.TASKS[recipe.data.task].needs_tokenizer


def validate(recipe: Recipe, check_files: bool = True) -> None:
    """Cross-section checks: everything that would fail later, reported now (each section checks
    its own values when it is built)."""
    _check_model(recipe)
    _check_data(recipe, check_files)
    _check_curriculum(recipe)
    _check_deepspeed(recipe)
    check_lora(recipe)
    _check_sample_sizes(recipe)
    if check_files:
        _check_positions(recipe)
    _need(recipe.guard.on_divergence != "rollback" or recipe.deepspeed_config is None,
          "guard.on_divergence='rollback' is not supported with training.deepspeed (DeepSpeed restores the "
          "checkpoint's learning rate); use 'stop' and resume with a lower training.learning_rate")


def _check_model(recipe: Recipe) -> None:
    """Compiled blocks and the dequantized-weight cache against what else the recipe asks for."""
    model = recipe.model
    _need(model.compile_mode not in CUDA_GRAPH_MODES or not recipe.memory.checkpoint_segments,
          f"model.compile_mode={model.compile_mode!r} captures CUDA graphs, which torch cannot record inside "
          "memory.checkpoint_segments' recompute; use compile_mode=null (or default) with checkpointed segments")
    _need(not (model.cache_dequantized_weights and recipe.zero_stage == 3),
          "model.cache_dequantized_weights=true with ZeRO-3 is not possible: the cache needs whole weights, ZeRO-3 "
          "partitions them; use ZeRO-2 or no cache")


def _check_data(recipe: Recipe, check_files: bool) -> None:
    """The data task and its options (the registry checks option names and values)."""
    data = recipe.data
    if recipe.trainer == "sft":
        _need(data.task == INSTRUCTION_TASK, f"data.task={data.task!r}: trainer sft reads an instruction dataset; "
                                             f"allowed: {INSTRUCTION_TASK!r}")
        _need("path" in data.options, f"data.options={data.options!r} needs path (datasets.load_dataset's, e.g. "
                                      f"json with data_files); optional: name, data_files, split, eval_split")
        if check_files:
            check_instruction_files(data.options)
    else:
        _need(data.task in registry.TASKS, f"data.task={data.task!r} is not known; allowed: {list(registry.TASKS)} "
                                           f"(or {INSTRUCTION_TASK!r} with trainer: sft)")
        try:
            registry.validate_options(data.task, data.options)
        except (ValueError, TypeError, OSError) as err:  # OSError: a named file (Lean theorems, ...) is missing
            raise RecipeError(f"data.options: {err}") from err


def _check_curriculum(recipe: Recipe) -> None:
    """The stages, checked once expand_curriculum has filled in the section's defaults."""
    mem, train, cur = recipe.memory, recipe.training, recipe.curriculum
    _need(isinstance(cur.levers_from_stage, int) and 0 <= cur.levers_from_stage < len(cur.stages),
          f"curriculum.levers_from_stage={cur.levers_from_stage!r}: expected an integer from 0 to "
          f"{len(cur.stages) - 1} (the stages are numbered from 0)")
    _need(cur.levers_from_stage == 0 or mem.memory_stability_weight > 0 or mem.memory_noise_std > 0
          or mem.associative_write_cost > 0 or mem.associative_forced_write_rate > 0
          or mem.associative_write_back_weight > 0,
          f"curriculum.levers_from_stage={cur.levers_from_stage} has no effect: memory.memory_stability_weight, "
          f"memory.memory_noise_std, memory.associative_write_cost, memory.associative_forced_write_rate and "
          f"memory.associative_write_back_weight are all 0")
    _need(cur.keep_best_segments is None or (isinstance(cur.keep_best_segments, int)
                                             and not isinstance(cur.keep_best_segments, bool)
                                             and cur.keep_best_segments >= 1),
          f"curriculum.keep_best_segments={cur.keep_best_segments!r}: expected null or an integer >= 1")
    _need(isinstance(cur.keep_best_samples, int) and cur.keep_best_samples >= 1,
          f"curriculum.keep_best_samples={cur.keep_best_samples!r}: expected an integer >= 1")
    _need(cur.keep_best_from_stage is None or cur.keep_best_segments is not None,
          f"curriculum.keep_best_from_stage={cur.keep_best_from_stage!r} has no effect without "
          f"curriculum.keep_best_segments")
    _need(cur.keep_best_from_stage is None or (isinstance(cur.keep_best_from_stage, int)
                                               and 0 <= cur.keep_best_from_stage < len(cur.stages)),
          f"curriculum.keep_best_from_stage={cur.keep_best_from_stage!r}: expected an integer from 0 to "
          f"{len(cur.stages) - 1} (the stages are numbered from 0)")
    if cur.keep_best_segments is not None:
        _need(recipe.trainer == "rmt", f"curriculum.keep_best_segments needs trainer: rmt (the memory tasks' "
                                       f"samples of a given length); trainer={recipe.trainer!r}")
        _need(recipe.keys.evaluates,
              f"curriculum.keep_best_segments={cur.keep_best_segments} scores the weights at each evaluation "
              f"during training; set training.eval_strategy=steps and training.eval_steps")
    for i, stage in enumerate(cur.stages):
        key = f"curriculum.stages[{i}]"
        for n in stage_segments(stage):
            _need(isinstance(n, int) and n >= 1, f"{key}.num_segments={stage.num_segments!r}: expected integers >= 1")
        _need(stage.max_steps is None or stage.max_steps >= 1,
              f"{key}.max_steps={stage.max_steps!r} must be >= 1")
        _need(stage.max_steps is not None or (recipe.keys.max_steps or 0) > 0,
              f"{key}.max_steps is not set: give curriculum.steps_per_stage, the stage's max_steps, or "
              f"training.max_steps (every stage needs a step budget; a metric can only end it earlier)")
        _need(stage.metric is None or stage.threshold is not None or stage.patience is not None,
              f"{key}.metric={stage.metric!r} needs threshold or patience (when to advance)")
        _need(stage.metric is not None or (stage.threshold is None and stage.patience is None),
              f"{key}: threshold/patience need a metric (e.g. eval_accuracy or eval_loss)")
        _need(stage.patience is None or stage.patience >= 1, f"{key}.patience={stage.patience} must be >= 1")
        _need(stage.metric is None or stage.metric in CURRICULUM_METRICS or f"eval_{stage.metric}" in CURRICULUM_METRICS,
              f"{key}.metric={stage.metric!r} is not reported by the evaluations during training; allowed: "
              f"{list(CURRICULUM_METRICS)} (or without the eval_ prefix)")
        if stage.metric is not None:
            _need(recipe.keys.evaluates,
                  f"{key}.metric={stage.metric!r} is computed by evaluations during training; set "
                  f"training.eval_strategy=steps and training.eval_steps")

    _need(not (mem.associative and train.get("gradient_checkpointing")),
          "training.gradient_checkpointing=true with memory.memory_kind='associative' is not supported: the "
          "associative memory reads and writes inside the decoder layers, which a per-layer recompute would run "
          "without it; use memory.checkpoint_segments=true (whole segments, memory flat in their number)")


def _check_deepspeed(recipe: Recipe) -> None:
    """Distributed and precision combinations."""
    model, mem = recipe.model, recipe.memory
    if recipe.deepspeed_config is not None:
        stage = recipe.zero_stage
        _need(model.quantization != "fp8",
              "model.quantization='fp8' with training.deepspeed is not supported: the e4m3 weights were not tested "
              "with DeepSpeed's broadcast and partitioning; train on one GPU, or use '8bit' / '4bit' (bitsandbytes "
              "under DeepSpeed)")
        _need(not (stage == 3 and model.quantization == "8bit"),
              "model.quantization='8bit' with ZeRO-3 (training.deepspeed) is not possible: bitsandbytes 8-bit "
              "weights cannot be partitioned; use ZeRO-2, or 4-bit with model.dtype set")
        _need(not (stage == 3 and (model.compile_blocks or model.compile_mode is not None)),
              f"{'model.compile_blocks=true' if model.compile_blocks else f'model.compile_mode={model.compile_mode!r}'}"
              f" with ZeRO-3 (training.deepspeed={recipe.keys.deepspeed!r}) is not supported: {ZERO3_NO_COMPILE}; "
              "set model.compile_blocks=null (resolves to off under ZeRO-3) or false and leave model.compile_mode "
              "unset, or train with ZeRO-2 (training.deepspeed=zero2), where compiled blocks work")
        compile_asks = [f"model.{name}={value!r}" for name, value, default in
                        (("compile_scope", model.compile_scope, "blocks"),
                         ("compile_memory_budget", model.compile_memory_budget, None)) if value != default]
        _need(not (stage == 3 and compile_asks),
              f"{' and '.join(compile_asks)} with ZeRO-3 (training.deepspeed={recipe.keys.deepspeed!r}) has no "
              f"effect: nothing is compiled under ZeRO-3 ({ZERO3_NO_COMPILE}); leave it unset, or train with ZeRO-2")
        _need(not (stage == 3 and mem.checkpoint_segments),
              "memory.checkpoint_segments=true with ZeRO-3 is not supported: the whole-segment recompute runs "
              "outside the layers' DeepSpeed hooks, which have already re-partitioned the frozen weights; use "
              "training.gradient_checkpointing=true (per layer, non-reentrant) instead, or ZeRO-2")
        _need(not (stage == 3 and model.quantization == "4bit" and model.dtype in (None, "float32", "fp32")),
              "model.quantization='4bit' with ZeRO-3 needs model.dtype=bfloat16 (or float16): the 4-bit "
              "storage dtype must equal the compute dtype to be partitioned")


def _check_sample_sizes(recipe: Recipe) -> None:
    """One sample of every length the run builds fits in host memory (``check_sample_fits``)."""
    mem, cur = recipe.memory, recipe.curriculum
    for i, stage in enumerate(cur.stages):
        check_sample_fits(max(stage_segments(stage)), mem.segment_size, f"curriculum.stages[{i}].num_segments")
    if recipe.eval.num_segments:
        check_sample_fits(max(recipe.eval.num_segments), mem.segment_size, "eval.num_segments")
    if cur.keep_best_segments is not None:
        check_sample_fits(cur.keep_best_segments, mem.segment_size, "curriculum.keep_best_segments")


def _check_positions(recipe: Recipe) -> None:
    """A segment with read and write memory must fit a learned position table; token ids must fit the
    vocabulary (read from the model's config.json only)."""
    model, mem, data = recipe.model, recipe.memory, recipe.data
    config = model_config(model)
    if config is not None:
        options_vocab = data.options.get("vocab_size") if recipe.trainer == "rmt" else None
        _need(not isinstance(options_vocab, int) or options_vocab <= config.vocab_size,
              f"data.options.vocab_size={options_vocab} is larger than the vocabulary of {model.name_or_path} "
              f"({config.vocab_size} tokens): token ids from {config.vocab_size} on have no embedding; allowed: "
              f"data.options.vocab_size <= {config.vocab_size}")
        limit = position_limit(config)
        need = mem.positions_per_segment
        memory_positions = "memory" if mem.associative else "2 x memory"
        _need(limit is None or need <= limit,
              f"memory.segment_size={mem.segment_size} with memory.num_memory_tokens={mem.num_memory_tokens} "
              f"needs {need} positions (segment + {memory_positions}), but {model.name_or_path} has {limit}; "
              f"allowed: segment_size <= {limit - (need - mem.segment_size) if limit else None}")
        ids = registry.token_ids_needed(data.task, data.options) if recipe.trainer != "sft" else None
        vocab = getattr(config, "vocab_size", None)
        _need(ids is None or vocab is None or vocab >= ids,
              f"model's vocab_size={vocab} is smaller than the {ids} token ids that task "
              f"{data.task!r} uses with data.options={data.options!r}; raise the vocabulary "
              f"(model.config.vocab_size for a tiny model) or shrink the task's ids")
        if model.is_tiny and needs_tokenizer(recipe):
            size = len(offline_tokenizer())
            _need(config.vocab_size >= size,
                  f"model.config.vocab_size={config.vocab_size} is smaller than the offline tokenizer "
                  f"({size} tokens) that task {data.task!r} needs; set model.config.vocab_size >= {size}")
