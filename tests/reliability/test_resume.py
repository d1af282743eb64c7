"""Killed at any step of any stage (or in the baseline run), a resumed run ends with the same
logged losses and the same weights as an uninterrupted run, and summary.json counts the steps
that were trained and averages each stage's loss over all of them. The kill is an exception
raised from a Trainer callback after a step: what is on disk is what a kill -9 at that moment
leaves (saves are atomic, see test_files.py)."""
import json
import os

import pytest
import torch

from rmt_peft.train.curriculum import StageCallback
from rmt_peft.recipe import load_recipe
from rmt_peft.train.trainer import run, train_recipe

QUIET = dict(log=lambda *_: None)


class Killed(Exception):
    pass


def losses(output_dir, stage, step=4):
    with open(os.path.join(output_dir, f"stage-{stage}", f"checkpoint-{step}", "trainer_state.json")) as f:
        return [entry["loss"] for entry in json.load(f)["log_history"] if "loss" in entry]


def kill_at(patch, stage, step, where=""):
    """Make the run raise Killed after optimizer step ``step`` of ``stage`` (of a run whose
    output folder contains ``where``)."""
    def on_step_end(self, args, state, control, **kwargs):
        if self.state.stage == stage and state.global_step == step and where in args.output_dir:
            raise Killed()
    patch.setattr(StageCallback, "on_step_end", on_step_end, raising=False)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_killed_in_the_first_middle_or_last_stage_resumes_exactly(write_recipe, monkeypatch, final_weights):
    full = load_recipe(write_recipe(name="full.yaml"))
    summary = train_recipe(full, **QUIET)
    reference = [losses(full.output_dir, k) for k in range(3)]
    assert [s["steps"] for s in summary["stages"]] == [4, 4, 4]
    assert all(len(r) == 4 and r[0] != r[-1] for r in reference)  # the schedule moves: a lost state would show

    # stage 0 after its checkpoint-2; stage 1 after checkpoint-2 (the stage after it must then start
    # from stage 1's end, not from that checkpoint again); the first step of the last stage.
    for stage, step in ((0, 3), (1, 3), (2, 1)):
        killed = load_recipe(write_recipe(name=f"killed{stage}.yaml"))
        with monkeypatch.context() as patch:
            kill_at(patch, stage, step)
            with pytest.raises(Killed):
                train_recipe(killed, **QUIET)
        assert not os.path.exists(os.path.join(killed.output_dir, "summary.json"))
        killed.training["resume_from_checkpoint"] = True
        resumed = train_recipe(killed, **QUIET)
        for k in range(3):
            assert losses(killed.output_dir, k) == pytest.approx(reference[k], rel=1e-5, abs=1e-7), (stage, k)
        assert [s["steps"] for s in resumed["stages"]] == [4, 4, 4]
        # each stage's train_loss averages all its steps (logged one by one), not only those after the resume
        assert [s["train_loss"] for s in resumed["stages"]] == pytest.approx([sum(r) / 4 for r in reference], rel=1e-4)
        assert_same_weights(final_weights(killed.output_dir), final_weights(full.output_dir))
        assert resumed["eval"]["3"]["loss"] == pytest.approx(summary["eval"]["3"]["loss"], rel=1e-5)


@pytest.mark.slow
def test_killed_in_the_baseline_run_resumes_it_and_keeps_the_memory_run(write_recipe, monkeypatch, final_weights):
    changes = {"curriculum.segments": [1, 2], "eval.baseline": True}
    full = load_recipe(write_recipe(changes, name="full.yaml"))
    summary = run(full, **QUIET)
    killed = load_recipe(write_recipe(changes, name="killed.yaml"))
    with monkeypatch.context() as patch:
        kill_at(patch, 1, 3, where="baseline")
        with pytest.raises(Killed):
            run(killed, **QUIET)
    killed.training["resume_from_checkpoint"] = True
    resumed = run(killed, **QUIET)
    base_dir = os.path.join(killed.output_dir, "baseline")
    for k in range(2):
        assert losses(base_dir, k) == pytest.approx(losses(os.path.join(full.output_dir, "baseline"), k), rel=1e-5)
    assert_same_weights(final_weights(base_dir), final_weights(os.path.join(full.output_dir, "baseline")))
    assert resumed["accuracy"] == summary["accuracy"]
    on_disk = json.load(open(os.path.join(killed.output_dir, "summary.json")))
    assert on_disk["status"] == "completed" and on_disk["baseline"]["stages"][1]["steps"] == 4
