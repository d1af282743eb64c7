"""The curriculum run (rmt_peft/train/trainer.py): summary.json of a finished run, the 0-memory
baseline's recipe, local paths made absolute, and the result table. Kills, resumes, divergence
and full disks are tests/reliability/'s; the curriculum's rules tests/train/test_curriculum.py's."""
import dataclasses
import json
import math
import os

import pytest

from rmt_peft.recipe import load_recipe
from rmt_peft.train.trainer import (baseline_recipe, eval_entry, finite, format_table, train_recipe,
                                    with_local_paths_resolved)


def test_a_finished_run_writes_final_and_a_summary_of_each_stage_and_length(write_recipe):
    recipe = load_recipe(write_recipe({"curriculum.steps_per_stage": 2, "eval.num_segments": [1, 3],
                                       "eval.num_samples": 4}))
    summary = train_recipe(recipe, log=lambda *_: None)
    with open(os.path.join(recipe.output_dir, "summary.json")) as f:
        assert json.load(f) == summary
    assert summary["status"] == "completed" and (summary["num_memory_tokens"], summary["segment_size"]) == (4, 8)
    assert [(s["stage"], s["num_segments"], s["steps"], s["reason"]) for s in summary["stages"]] == [
        (0, 1, 2, "step budget (2)"), (1, 2, 2, "step budget (2)")]
    assert sorted(summary["eval"]) == ["1", "3"]
    for entry in summary["eval"].values():
        assert 0 <= entry["accuracy"] <= 1 and entry["perplexity"] == pytest.approx(math.exp(entry["loss"]))
    assert summary["world_size"] == 1 and summary["versions"]["torch"] and summary["wall_seconds"] >= 0
    assert {"memory_config.json", "memory.safetensors"} <= set(os.listdir(os.path.join(recipe.output_dir, "final")))
    assert not os.path.exists(os.path.join(recipe.output_dir, ".rmt-peft.lock"))  # released


def test_the_baseline_is_the_same_run_without_memory_in_the_runs_baseline_folder(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe({"eval.baseline": True, "memory.num_memory_tokens": 4}))
    base = baseline_recipe(recipe)
    assert base.memory.num_memory_tokens == 0 and not base.eval.baseline
    assert base.output_dir == os.path.join(recipe.output_dir, "baseline")
    assert dataclasses.replace(base.memory, num_memory_tokens=4) == recipe.memory
    assert base.curriculum == recipe.curriculum and base.data == recipe.data
    # a resume resumes the baseline only once it had started
    resumed = dataclasses.replace(recipe, training={**recipe.training, "resume_from_checkpoint": True})
    assert baseline_recipe(resumed).training["resume_from_checkpoint"] is False
    os.makedirs(base.output_dir)
    (tmp_path / "run" / "baseline" / "recipe.yaml").write_text("")
    assert baseline_recipe(resumed).training["resume_from_checkpoint"] is True


def test_local_model_and_tokenizer_paths_are_made_absolute(write_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    recipe = load_recipe(write_recipe({"model.tokenizer": "tok"}))
    assert with_local_paths_resolved(recipe).model.tokenizer == str(tmp_path / "tok")
    assert with_local_paths_resolved(recipe).model.name_or_path == "tiny:gpt_neo"  # not a folder here
    plain = load_recipe(write_recipe())
    assert with_local_paths_resolved(plain) is plain


def test_non_finite_numbers_are_left_out_and_the_table_sorts_lengths_as_numbers():
    assert finite(float("nan")) is None and finite(float("inf")) is None and finite(None) is None and finite(2.5) == 2.5
    assert eval_entry(0.5, math.log(4.0)) == {"accuracy": 0.5, "loss": math.log(4.0), "perplexity": pytest.approx(4.0)}
    assert eval_entry(float("nan"), float("inf")) == {"accuracy": None, "loss": None, "perplexity": None}
    assert eval_entry(1.0, 60.0)["perplexity"] is None  # exp(60) says nothing a loss of 60 does not
    summary = {"num_memory_tokens": 4, "eval": {"10": {"accuracy": 0.25}, "2": {"accuracy": None}},
               "baseline": {"eval": {"10": {"accuracy": 0.125}, "2": {"accuracy": 0.5}}}}
    # columns right-aligned in 8, 22 and 20 characters
    assert format_table(summary).splitlines() == [
        "segments |" + " " * 4 + "accuracy (4 memory) |" + " " * 2 + "accuracy (0 memory)",
        "-" * 56,
        "       2 |" + " " * 20 + "n/a |" + " " * 16 + "0.500",
        "      10 |" + " " * 18 + "0.250 |" + " " * 16 + "0.125"]
    assert format_table({"num_memory_tokens": 2, "eval": {"all": {"accuracy": 1.0}, "3": {"accuracy": 0.0}}}) == (
        "segments |" + " " * 4 + "accuracy (2 memory)\n" + "-" * 33 + "\n"
        "       3 |" + " " * 18 + "0.000\n"
        "     all |" + " " * 18 + "1.000")
