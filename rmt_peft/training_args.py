"""The recipe's ``training`` section against what the engine does with it.

Every key is a ``transformers.TrainingArguments`` field (trl's ``SFTConfig`` with ``trainer: sft``)
and reaches every stage's arguments verbatim, except the fields in ``OWNED``: one table that
validation reads (``recipe.check_training`` refuses what a recipe may not set) and the engine
applies (``stage_arguments``: what each stage's arguments get instead). ``UNSUPPORTED`` are the
fields the curriculum does not honour. ``TrainingKeys`` is the typed view of the keys the engine
reads itself (``Recipe.keys``); the DeepSpeed config that ``training.deepspeed`` names is resolved
(a shipped name becomes its file) when the recipe loads, and read once.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from . import resources, runs
from .errors import RecipeError

PER_STAGE = "per stage"  # the engine computes the value for each stage
DROP = "drop"            # the engine reads the key itself; the Trainer never sees it
DEFAULT = "default"      # the Trainer's own default (the recipe may not change it)


@dataclass(frozen=True)
class Owned:
    """What every stage's TrainingArguments get for one field (a value, ``PER_STAGE``, ``DROP`` or
    ``DEFAULT``), and why; ``settable``: whether a recipe may set the field (what it means then is
    the engine's: ``output_dir`` is the run folder, ``max_steps`` the cap on all stages together);
    ``trainer``: the rule holds for that trainer only."""

    value: object
    why: str
    settable: bool = True
    trainer: str | None = None


CHECKPOINTING = "the engine enables it on the backbone (per layer, non-reentrant), not the Trainer"
OWNED = {
    "output_dir": Owned(PER_STAGE, "the run folder; each stage saves its checkpoints in a folder of its own"),
    "max_steps": Owned(PER_STAGE, "the cap on all stages together; each stage gets what is left of its budget"),
    "seed": Owned(PER_STAGE, "stage k trains with seed + k"),
    "resume_from_checkpoint": Owned(DROP, "the curriculum resumes itself, in any stage"),
    "gradient_checkpointing": Owned(False, CHECKPOINTING),
    "activation_checkpointing": Owned(False, CHECKPOINTING),  # a field after transformers 5.17
    "gradient_checkpointing_kwargs": Owned(DROP, CHECKPOINTING),
    "activation_checkpointing_kwargs": Owned(DROP, CHECKPOINTING),
    "remove_unused_columns": Owned(False, "the collator drops the columns the model does not take", settable=False),
    "label_names": Owned(DEFAULT, "the engine sets it", settable=False),
    "max_length": Owned(PER_STAGE, "each curriculum stage truncates to its number of segments x memory.segment_size",
                        settable=False, trainer="sft"),
    "packing": Owned(DEFAULT, "packed samples would share one memory across unrelated documents", settable=False,
                     trainer="sft"),
    "padding_free": Owned(DEFAULT, "the memory model reads padded batches segment by segment", settable=False,
                          trainer="sft"),
}
CHECKPOINTING_KEYS = ("activation_checkpointing", "gradient_checkpointing")
# TrainingArguments fields the curriculum engine does not honour: rejected with the reason.
UNSUPPORTED = {"num_train_epochs": "the curriculum counts optimizer steps: give curriculum.steps_per_stage or a "
                                   "stage's max_steps (training.max_steps caps all stages together)",
               "push_to_hub": "the Trainer would push every stage's checkpoints; upload the trained adapter with "
                              "rmt-peft export OUTPUT_DIR --to DIR --push-to-hub REPO_ID",
               "fsdp": "FSDP is not supported; shard with training.deepspeed (zero2, zero3, zero3_offload)"}


def owned(trainer: str) -> dict[str, Owned]:
    """The rows of ``OWNED`` that hold for ``trainer``."""
    return {name: rule for name, rule in OWNED.items() if rule.trainer in (None, trainer)}


def stage_arguments(training: dict, trainer: str, fields: set[str], per_stage: dict) -> dict:
    """The keyword arguments of one stage's TrainingArguments: the recipe's ``training`` with the
    ``OWNED`` rules applied (``per_stage``: the values computed for this stage; ``fields``: the
    fields the arguments class has, as a rule may name one an older transformers lacks)."""
    kwargs = dict(training)
    for name, rule in owned(trainer).items():
        if rule.value == DROP:
            kwargs.pop(name, None)
        elif rule.value == PER_STAGE:
            kwargs[name] = per_stage[name]
        elif rule.value != DEFAULT and name in fields:
            kwargs[name] = rule.value
    return kwargs


# -- deepspeed ------------------------------------------------------------------------------
def resolve_deepspeed(value):
    """A DeepSpeed config: a dict, a json file, or a shipped name ("zero2", ``rmt-peft recipes``)."""
    if value is None or isinstance(value, dict):
        return value
    # a file, not any path: a folder named "zero2" in the working directory (a run's output_dir,
    # say) must not hide the shipped config of that name
    if os.path.isfile(value):
        return value
    named = resources.path(resources.DEEPSPEED_CONFIGS, value)
    if named is not None:
        return named
    raise RecipeError(f"training.deepspeed={value!r} is neither a file nor a shipped config; allowed: a json "
                      f"file, a mapping, or one of {resources.names(resources.DEEPSPEED_CONFIGS)}")


def read_deepspeed_config(value) -> dict | None:
    value = resolve_deepspeed(value)
    if value is None or isinstance(value, dict):
        return value
    try:
        with open(value) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise RecipeError(f"training.deepspeed={value!r} is not valid JSON: {err}") from err


# -- the keys the engine reads ---------------------------------------------------------------
@dataclass(frozen=True)
class TrainingKeys:
    """The ``training`` keys the engine reads itself, typed (the rest reach TrainingArguments as given)."""

    output_dir: str
    seed: int
    max_steps: int | None                 # the cap on all stages together (None or <= 0: none)
    resume: bool | str | None             # true: the furthest point in output_dir; a folder: that save
    deepspeed: str | dict | None          # a config file or a mapping (a shipped name resolved)
    deepspeed_config: dict | None         # its content
    half_precision: bool                  # bf16 or fp16
    checkpointing: bool                   # per-layer activation checkpointing, on the backbone
    evaluates: bool                       # evaluations during training (eval_strategy is not "no")

    @property
    def zero_stage(self) -> int:
        return int((self.deepspeed_config or {}).get("zero_optimization", {}).get("stage", 0))

    @classmethod
    def of(cls, training: dict, deepspeed_config: dict | None) -> "TrainingKeys":
        """The view of ``training``; ``deepspeed_config``: what ``read_deepspeed_config`` read."""
        return cls(output_dir=training["output_dir"], seed=runs.seed_of(training),
                   max_steps=training.get("max_steps"), resume=training.get("resume_from_checkpoint"),
                   deepspeed=training.get("deepspeed"), deepspeed_config=deepspeed_config,
                   half_precision=bool(training.get("bf16") or training.get("fp16")),
                   checkpointing=any(training.get(k) for k in CHECKPOINTING_KEYS),
                   evaluates=training.get("eval_strategy", "no") != "no")
