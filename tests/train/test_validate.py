"""``validate`` knows what training will need: metric names the curriculum can see, reporters that
are installed, and TrainingArguments fields the engine does not honour."""
import pytest

from rmt_peft.recipe import CURRICULUM_METRICS, RecipeError, load_recipe
from rmt_peft.train.arguments import training_arguments
from rmt_peft.train.build import build_model, build_tokenizer
from rmt_peft.train.datasets import Collator
from rmt_peft.train.engine import stage_trainer

STAGES = ["curriculum.segments=[]", "training.eval_strategy=steps", "training.eval_steps=2"]


def error_of(path, overrides):
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


@pytest.mark.parametrize("override, expected", [
    ("training.num_train_epochs=3", ["num_train_epochs", "steps_per_stage"]),
    ("training.push_to_hub=true", ["push_to_hub", "rmt-peft export", "--push-to-hub"]),
    ("training.fsdp=full_shard", ["fsdp", "training.deepspeed"]),
    ("training.report_to=wandb", ["'wandb' is not installed", "tensorboard"]),
    ("training.report_to=[tensorboard, nonsense]", ["'nonsense' is not an integration", "wandb"]),
])
def test_training_fields_the_engine_cannot_honour_are_rejected_with_the_reason(write_recipe, override, expected):
    message = error_of(write_recipe(), [override])
    for part in expected:
        assert part in message, (part, message)


def test_curriculum_metric_must_be_one_the_evaluations_report(write_recipe, tmp_path):
    message = error_of(write_recipe(), [*STAGES, "curriculum.stages=[{num_segments: 1, metric: eval_acc, "
                                                 "threshold: 0.9}]"])
    assert "eval_acc" in message and "eval_accuracy" in message
    for metric in ("accuracy", "eval_loss"):
        load_recipe(write_recipe(), [*STAGES, f"curriculum.stages=[{{num_segments: 1, metric: {metric}, "
                                              "patience: 2}]"])
    # what the validation allows is what an evaluation during training reports
    recipe = load_recipe(write_recipe())
    args = training_arguments(recipe, str(tmp_path / "stage"), max_steps=1, seed=0)
    trainer = stage_trainer(recipe, build_model(recipe, 0), args, build_tokenizer(recipe), Collator(), [1], None)
    metrics = trainer.evaluate(eval_dataset=trainer.train_dataset)
    assert set(CURRICULUM_METRICS) <= set(metrics)
