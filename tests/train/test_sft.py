"""Instruction data through trl: a prompt/completion JSONL dataset trains the same memory model
with trl's SFTTrainer conventions (completion-only loss, truncation per curriculum stage)."""
import json

import pytest
import torch

from rmt_peft.recipe import RecipeError, load_recipe
from rmt_peft.train.arguments import training_arguments
from rmt_peft.train.build import build_model, build_tokenizer
from rmt_peft.train.engine import stage_trainer
from rmt_peft.train.trainer import run

PAIRS = [("where is mary ? ", "kitchen"), ("where is john ? ", "garden"), ("where is daniel ? ", "office"),
         ("where is sandra ? ", "hallway")] * 4


def sft_recipe(write_recipe, tmp_path, *overrides):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    path = write_recipe({"trainer": "sft", "model.config": {"vocab_size": 640, "max_positions": 64},
                         "memory.segment_size": 16,
                         "data": {"task": "instruction", "options": {"path": "json", "data_files": str(data)},
                                  "num_train_samples": 16, "num_eval_samples": 4},
                         "curriculum": {"segments": [1, 2], "steps_per_stage": 2}})
    return load_recipe(path, list(overrides))


def test_sft_recipes_are_checked_against_sftconfig(write_recipe, tmp_path):
    recipe = sft_recipe(write_recipe, tmp_path, "training.completion_only_loss=true")
    assert recipe.trainer == "sft" and recipe.training["completion_only_loss"] is True
    with pytest.raises(RecipeError, match="max_length"):
        sft_recipe(write_recipe, tmp_path, "training.max_length=100")
    with pytest.raises(RecipeError, match="instruction"):
        sft_recipe(write_recipe, tmp_path, "data.task=token_memory")


@pytest.mark.slow
def test_prompt_completion_data_trains_the_memory_model_with_completion_only_loss(write_recipe, tmp_path):
    recipe = sft_recipe(write_recipe, tmp_path)
    tokenizer = build_tokenizer(recipe)
    args = training_arguments(recipe, str(tmp_path / "probe"), 1, 0, max_segments=2)
    assert args.max_length == 2 * recipe.memory.segment_size
    trainer = stage_trainer(recipe, build_model(recipe, 0), args, tokenizer, None, [1, 2], None)
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        labelled = ids[labels != -100].tolist()
        completions = [tokenizer(c, add_special_tokens=False)["input_ids"] for _, c in PAIRS]
        # the loss covers the completion (and the end-of-sequence token trl appends), never the prompt
        assert any(labelled[:len(c)] == c and len(labelled) - len(c) <= 1 for c in completions), labelled
        assert int((labels != -100).sum()) < int((ids != tokenizer.pad_token_id).sum())

    too_short = sft_recipe(write_recipe, tmp_path, "memory.segment_size=4", "training.output_dir=" + str(tmp_path / "x"))
    with pytest.raises(RecipeError, match="no usable rows"):
        run(too_short, log=lambda *_: None)

    summary = run(recipe, log=lambda *_: None)
    assert [s["steps"] for s in summary["stages"]] == [2, 2]
    assert torch.isfinite(torch.tensor(summary["eval"]["all"]["loss"]))
    assert (tmp_path / "run" / "final" / "memory.safetensors").exists()
