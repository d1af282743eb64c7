"""The curriculum is one TensorBoard run: one log folder, a global step that continues across
stages, and the stage as a scalar."""
import os
import sys
import types

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rmt_peft.train import tracking
from rmt_peft.recipe import load_recipe
from rmt_peft.train.trainer import train_recipe


def test_stages_log_one_curve_with_a_global_step_and_the_stage(write_recipe):
    # two stages of 3 and 2 steps, a loss logged every step
    recipe = load_recipe(write_recipe({"curriculum": {"stages": [{"num_segments": 1, "max_steps": 3},
                                                                 {"num_segments": 2, "max_steps": 2}]},
                                       "training.report_to": "tensorboard", "data.num_train_samples": 16}))
    train_recipe(recipe, log=lambda *_: None)
    logs = os.path.join(recipe.output_dir, "logs")
    assert not any(os.path.isdir(os.path.join(recipe.output_dir, f"stage-{k}", "runs")) for k in (0, 1))
    events = EventAccumulator(logs)
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5]
    stage = events.Scalars("train/curriculum_stage")
    # (also logged with each stage's summary and the final evaluation, at the same steps)
    assert {(e.step, e.value) for e in stage} == {(1, 0), (2, 0), (3, 0), (4, 1), (5, 1)}
    segments = {e.step: e.value for e in events.Scalars("train/curriculum_num_segments")}
    assert segments[3] == 1 and segments[5] == 2
    # epoch grows across stages (16 samples / batch 4: 0.25 a step), not a sawtooth restarting at 0
    epochs = [e.value for e in events.Scalars("train/epoch")]
    assert epochs == sorted(epochs) and epochs[-1] > 1.0
    tags = events.Tags()["scalars"]
    assert not [t for t in tags if "total_flos" in t or "/final_" in t], tags  # no 0 FLOPs, no one-point scalars
    # the final evaluation: one group, accuracy and loss against the number of segments (eval.num_segments [2])
    assert [e.step for e in events.Scalars("final_eval/accuracy")] == [2]
    assert [e.step for e in events.Scalars("final_eval/loss")] == [2]


def test_the_baseline_gets_a_wandb_run_of_its_own(monkeypatch):
    finished = []
    fake = types.SimpleNamespace(run=object(), finish=lambda: finished.append(True))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracking.end_run()
    assert finished == [True]
    fake.run = None  # no active run: nothing to finish
    tracking.end_run()
    assert finished == [True]
