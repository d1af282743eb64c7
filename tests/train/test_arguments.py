"""One stage's TrainingArguments (rmt_peft/train/arguments.py): the recipe's training section with
the stage's output folder, steps and seed, the engine's own settings, the CPU when there is no GPU,
trl's SFTConfig cut to the stage's segments, and a value the Trainer refuses named as a recipe error."""
import dataclasses
import json

import pytest
import torch
from transformers import TrainingArguments

from rmt_peft.recipe import RecipeError, load_recipe
from rmt_peft.train.arguments import distributed_cpu_deepspeed, training_arguments


def test_a_stage_gets_its_folder_steps_and_seed_and_the_recipes_settings(write_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = load_recipe(write_recipe({"training.learning_rate": 0.01, "training.gradient_accumulation_steps": 2}))
    args = training_arguments(recipe, str(tmp_path / "stage-1"), max_steps=7, seed=11, max_segments=3)
    assert type(args) is TrainingArguments
    assert (args.output_dir, args.max_steps, args.seed) == (str(tmp_path / "stage-1"), 7, 11)
    assert (args.learning_rate, args.gradient_accumulation_steps, args.per_device_train_batch_size) == (0.01, 2, 4)
    assert args.use_cpu and not args.remove_unused_columns and not args.gradient_checkpointing
    assert args.report_to == []  # the recipe's "none"
    unset = dataclasses.replace(recipe, training={k: v for k, v in recipe.training.items() if k != "report_to"})
    assert training_arguments(unset, str(tmp_path / "s"), 1, 0).report_to == ["tensorboard"]  # one curve by default


def test_trl_gets_an_sftconfig_cut_to_the_stages_segments(write_recipe, tmp_path):
    from trl import SFTConfig

    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"prompt": "where is mary ? ", "completion": "kitchen"}) + "\n")
    recipe = load_recipe(write_recipe({"trainer": "sft", "model.config": {"vocab_size": 640, "max_positions": 64},
                                       "memory.segment_size": 16,
                                       "data": {"task": "instruction", "options": {"path": "json",
                                                                                    "data_files": str(data)}}}))
    args = training_arguments(recipe, str(tmp_path / "stage-0"), max_steps=2, seed=0, max_segments=3)
    assert isinstance(args, SFTConfig) and args.max_length == 3 * 16


def test_a_value_the_trainer_refuses_is_a_recipe_error(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe())
    bad = dataclasses.replace(recipe, training={**recipe.training, "lr_scheduler_type": "sometimes"})
    with pytest.raises(RecipeError, match=r"^training: .*sometimes"):
        training_arguments(bad, str(tmp_path / "stage-0"), 1, 0)


def test_deepspeed_on_cpu_ranks_is_told_by_the_launchers_environment(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert not distributed_cpu_deepspeed({"deepspeed": "zero2.json"})
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed_cpu_deepspeed({"deepspeed": "zero2.json"})
    assert not distributed_cpu_deepspeed({"deepspeed": None}) and not distributed_cpu_deepspeed({})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not distributed_cpu_deepspeed({"deepspeed": "zero2.json"})
