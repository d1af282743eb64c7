"""The rules the engine owns over TrainingArguments (rmt_peft/training_args.py): one table that
validation refuses by and the engine applies, and the typed view of the keys the engine reads."""
import copy
import dataclasses

import pytest
from transformers import TrainingArguments

from rmt_peft import recipe as recipe_module
from rmt_peft import resources
from rmt_peft.recipe import RecipeError, check_training, load_recipe, validate
from rmt_peft.training_args import DEFAULT, DROP, OWNED, PER_STAGE, stage_arguments

FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}


@pytest.mark.parametrize("name", [n for n, rule in OWNED.items() if not rule.settable])
def test_validation_refuses_every_field_the_table_keeps_for_the_engine(name, tmp_path):
    trainer = OWNED[name].trainer or "rmt"
    with pytest.raises(RecipeError, match=f"training.{name} cannot be set: {OWNED[name].why}"):
        check_training({"output_dir": str(tmp_path / "run"), name: 1}, trainer)


def test_the_engine_applies_the_table_to_every_stage():
    training = {"output_dir": "runs/x", "seed": 7, "max_steps": 100, "resume_from_checkpoint": True,
                "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False},
                "learning_rate": 1e-3}
    per_stage = {"output_dir": "runs/x/stage-2", "max_steps": 30, "seed": 9, "max_length": 512}
    args = stage_arguments(training, "rmt", FIELDS, per_stage)
    expected = {"output_dir": "runs/x/stage-2", "seed": 9, "max_steps": 30, "gradient_checkpointing": False,
                "remove_unused_columns": False, "learning_rate": 1e-3}
    if "activation_checkpointing" in FIELDS:  # a field after transformers 5.17
        expected["activation_checkpointing"] = False
    assert args == expected
    assert stage_arguments(training, "sft", FIELDS, per_stage)["max_length"] == 512
    assert {rule.value for rule in OWNED.values()} >= {PER_STAGE, DROP, DEFAULT, False}


def test_validation_changes_nothing_and_the_deepspeed_config_is_read_once(tmp_path, monkeypatch):
    recipe = load_recipe(resources.path(resources.RECIPES, "quickstart"),
                         [f"training.output_dir={tmp_path / 'run'}", "training.deepspeed=zero2"])
    assert recipe.training["deepspeed"] == resources.path(resources.DEEPSPEED_CONFIGS, "zero2")  # resolved on load
    before = copy.deepcopy(recipe.training)
    monkeypatch.setattr(recipe_module, "read_deepspeed_config", lambda value: pytest.fail("read again"))
    validate(recipe, check_files=False)
    assert recipe.training == before
    assert recipe.zero_stage == 2 and recipe.keys.deepspeed_config["zero_optimization"]["stage"] == 2
