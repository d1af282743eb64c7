"""The TrainingArguments of one curriculum stage: the recipe's ``training`` section with the rules
the engine owns applied (``rmt_peft.training_args.OWNED``, the table validation reads too)."""
from __future__ import annotations

import dataclasses
import os

import torch
from transformers import TrainingArguments

from ..recipe import Recipe, RecipeError
from ..training_args import stage_arguments


def distributed_cpu_deepspeed(training: dict) -> bool:
    """True when DeepSpeed runs on CPU ranks (gloo) under a launcher."""
    return bool(training.get("deepspeed")) and not torch.cuda.is_available() and "LOCAL_RANK" in os.environ


def training_arguments(recipe: Recipe, output_dir: str, max_steps: int, seed: int,
                       max_segments: int = 1) -> TrainingArguments:
    """The stage's TrainingArguments (SFTConfig for trl: inputs truncated to the stage's segments)."""
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    per_stage = {"output_dir": output_dir, "max_steps": max_steps, "seed": seed,
                 "max_length": max_segments * recipe.memory.segment_size}  # trl: inputs cut to the stage's segments
    kwargs = stage_arguments(recipe.training, recipe.trainer, fields, per_stage)
    kwargs.setdefault("report_to", "tensorboard")
    if not torch.cuda.is_available() and not kwargs.get("deepspeed"):
        kwargs["use_cpu"] = True
    if distributed_cpu_deepspeed(kwargs):
        # Accelerate only sets DeepSpeed up on accelerators; on CPU ranks we configure the
        # process group (gloo) first and let the Trainer use it.
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        os.environ.pop("ACCELERATE_USE_DEEPSPEED")
        kwargs["accelerator_config"] = {**(kwargs.get("accelerator_config") or {}), "use_configured_state": True}
    config_class = TrainingArguments
    if recipe.trainer == "sft":
        from trl import SFTConfig

        config_class = SFTConfig
    try:
        return config_class(**kwargs)
    except ValueError as err:
        raise RecipeError(f"training: {err}") from err

