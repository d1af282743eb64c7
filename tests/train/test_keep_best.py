"""curriculum.keep_best_segments: final/ holds the weights that scored best on longer held-out
inputs."""
import os

import pytest
import torch
from safetensors.torch import load_file

from rmt_peft.data.tokenizer import offline_tokenizer
from rmt_peft.eval.memory_tasks import score_batch
from rmt_peft.recipe import RecipeError, load_recipe
from rmt_peft.runs import read_kept
from rmt_peft.train.build import build_model
from rmt_peft.train.datasets import build_dataset
from rmt_peft.train.engine import RMTTrainer, load_trainable
from rmt_peft.train.keep_best import replaces_kept
from rmt_peft.train.trainer import train_recipe


def test_the_first_score_is_kept_and_a_tie_goes_to_the_later_weights():
    """The rule of rmt-peft train's best/ and of the learning benchmark's selection."""
    assert replaces_kept(0.0, None)
    assert replaces_kept(0.5, 0.5) and replaces_kept(0.6, 0.5)
    assert not replaces_kept(0.4, 0.5)


def test_keep_best_fields_are_checked(write_recipe):
    with pytest.raises(RecipeError, match="training.eval_strategy=steps"):
        load_recipe(write_recipe({"curriculum.keep_best_segments": 8}))
    with pytest.raises(RecipeError, match=r"curriculum.keep_best_segments=0: expected null or an integer >= 1"):
        load_recipe(write_recipe({"curriculum.keep_best_segments": 0, "training.eval_strategy": "steps",
                                  "training.eval_steps": 2}))
    with pytest.raises(RecipeError, match="keep_best_from_stage=1 has no effect"):
        load_recipe(write_recipe({"curriculum.keep_best_from_stage": 1}))
    with pytest.raises(RecipeError, match=r"keep_best_from_stage=2: expected an integer from 0 to 1"):
        load_recipe(write_recipe({"curriculum.keep_best_segments": 8, "curriculum.keep_best_from_stage": 2,
                                  "training.eval_strategy": "steps", "training.eval_steps": 2}))


def weights(folder):
    return {**load_file(os.path.join(folder, "memory.safetensors")), **load_file(os.path.join(folder, "model.safetensors"))}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


KEEP_BEST = {"curriculum.keep_best_segments": 6, "curriculum.keep_best_samples": 32,
             "training.eval_strategy": "steps", "training.eval_steps": 2, "training.learning_rate": 2.0e-2}


@pytest.mark.slow
def test_final_holds_the_best_scored_weights(write_recipe, monkeypatch, tmp_path):
    """Scored at 6 segments every 2 steps of both stages: kept.json names the best score (the
    latest among ties) and the best weights, scored again by the evaluator on the same held-out
    samples, give its accuracy. With scores made up (0.5, 0.9, 0.9, 0.2) the weights of step 6
    become final/, not the last ones (stage 1's end/)."""
    recipe = load_recipe(write_recipe(KEEP_BEST))
    summary = train_recipe(recipe, log=lambda *_: None)
    scores = summary["keep_best"]["scores"]
    assert [(s["stage"], s["step"]) for s in scores] == [(0, 2), (0, 4), (1, 6), (1, 8)]
    kept = read_kept(recipe.output_dir)
    best = max(s["accuracy"] for s in scores)
    assert kept == summary["keep_best"]["kept"]
    assert kept["accuracy"] == best and kept["step"] == max(s["step"] for s in scores if s["accuracy"] == best)
    model = build_model(recipe, int(recipe.training["seed"])).eval()
    load_trainable(model, os.path.join(recipe.output_dir, "best"))
    data = build_dataset(recipe, offline_tokenizer(), [6], 32, recipe.data.seed + 3)
    assert score_batch(model, [data[i] for i in range(32)]).mean().item() == pytest.approx(kept["accuracy"])

    made_up = iter([0.5, 0.9, 0.9, 0.2])
    monkeypatch.setattr(RMTTrainer, "evaluate", scripted_evaluate(made_up))
    recipe = load_recipe(write_recipe({**KEEP_BEST, "training.output_dir": str(tmp_path / "scripted")}, "scripted.yaml"))
    summary = train_recipe(recipe, log=lambda *_: None)
    out = recipe.output_dir
    assert summary["keep_best"]["kept"] == {"stage": 1, "step": 6, "num_segments": 6, "accuracy": 0.9}
    assert same(weights(os.path.join(out, "final")), weights(os.path.join(out, "best")))
    assert not same(weights(os.path.join(out, "final")), weights(os.path.join(out, "stage-1", "end")))


def scripted_evaluate(scores):
    """RMTTrainer.evaluate whose keep_best accuracy at 6 segments is the next of ``scores``."""
    evaluate = RMTTrainer.evaluate

    def scripted(self, *args, metric_key_prefix="eval", **kwargs):
        metrics = evaluate(self, *args, metric_key_prefix=metric_key_prefix, **kwargs)
        if metric_key_prefix == "keep_best_6":
            metrics["keep_best_6_accuracy"] = next(scores)
        return metrics
    return scripted


class Killed(Exception):
    pass


@pytest.mark.slow
def test_a_resumed_run_keeps_the_best_weights_scored_before_the_kill(write_recipe, monkeypatch):
    """Stage 0 scores 0.9 then 0.5 and the run is killed in stage 1; resumed, stage 1 scores 0.7
    and 0.2: final/ holds stage 0's step-2 weights, read back from best/."""
    from rmt_peft.train.curriculum import StageCallback

    monkeypatch.setattr(RMTTrainer, "evaluate", scripted_evaluate(iter([0.9, 0.5, 0.7, 0.2])))
    recipe = load_recipe(write_recipe(KEEP_BEST))

    def on_step_end(self, args, state, control, **kwargs):
        if self.state.stage == 1 and state.global_step == 1:
            raise Killed()

    with monkeypatch.context() as patch:
        patch.setattr(StageCallback, "on_step_end", on_step_end, raising=False)
        with pytest.raises(Killed):
            train_recipe(recipe, log=lambda *_: None)
    assert read_kept(recipe.output_dir) == {"stage": 0, "step": 2, "num_segments": 6, "accuracy": 0.9}
    recipe.training["resume_from_checkpoint"] = True
    summary = train_recipe(recipe, log=lambda *_: None)
    assert [s["accuracy"] for s in summary["keep_best"]["scores"]] == [0.7, 0.2]
    assert summary["keep_best"]["kept"] == {"stage": 0, "step": 2, "num_segments": 6, "accuracy": 0.9}
    out = recipe.output_dir
    assert same(weights(os.path.join(out, "final")), weights(os.path.join(out, "best")))
    assert not same(weights(os.path.join(out, "final")), weights(os.path.join(out, "stage-0", "end")))
