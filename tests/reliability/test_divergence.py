"""The divergence guard: a NaN/inf loss or gradient, or a gradient norm that jumps far above its
running level and stays there, stops the run with TrainingDiverged (exit 3 from the command) and a
valid summary.json saying so; or, with guard.on_divergence=rollback, the stage goes back to its
last good save with a lower learning rate."""
import json
import math
import os

import pytest
import torch

from rmt_peft.cli import main
from rmt_peft.errors import TrainingDiverged
from rmt_peft.train.guard import DivergenceGuard
from rmt_peft.recipe import load_recipe
from rmt_peft.train.engine import RMTTrainer
from rmt_peft.train.trainer import train_recipe

QUIET = dict(log=lambda *_: None)
# transformers' own GPT-Neo computation (model.speedups=false): its gradients grow for a few steps
# before they overflow, so the run meets the spike rule (3 steps in a row) first, not inf
EXPLODING = {"training.learning_rate": 1.0e3, "training.max_grad_norm": 0, "guard.spike_steps": 3,
             "model.speedups": False}


def strict_json(path):
    """json.load refusing NaN / Infinity, which are not JSON."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_non_finite_values_and_lasting_spikes_are_divergence_but_gradual_growth_is_not():
    guard = DivergenceGuard(spike_factor=10, spike_steps=3)
    guard.note_loss(2.0)
    guard.note_loss(float("nan"))  # one micro-batch of the step: the step is refused before the optimizer
    guard.note_loss(3.0)
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        guard.check_step(1.0, step=1)
    guard.note_loss(torch.tensor(2.0))  # the Trainer's losses and norms are tensors, read in one sync
    guard.note_loss(torch.tensor(float("inf"), dtype=torch.bfloat16))
    with pytest.raises(TrainingDiverged, match="loss is inf"):
        guard.check_step(torch.tensor(1.0), step=2)
    with pytest.raises(TrainingDiverged, match="gradient norm is inf"):
        guard.check_step(torch.tensor(float("inf")), step=3)

    guard = DivergenceGuard(spike_factor=10, spike_steps=3)
    for step in range(1, 41):  # grows 8% a step: 20x over the run, the running level follows
        guard.check_grad_norm(1.08 ** step, step)
    for step, norm in ((41, 500.0), (42, 1.0e4), (43, 30.0)):  # two spikes, then back under 10 x level
        guard.check_grad_norm(norm, step)
    guard.check_grad_norm(5.0e3, 44)
    guard.check_grad_norm(5.0e3, 45)
    with pytest.raises(TrainingDiverged) as err:
        guard.check_grad_norm(5.0e3, 46)
    assert err.value.step == 46 and err.value.first_bad_step == 44  # checkpoints before step 44 are good


@pytest.mark.slow
def test_an_exploding_run_stops_with_exit_3_and_a_valid_summary(write_recipe, capsys):
    path = write_recipe()
    out = load_recipe(path).output_dir
    overrides = [f"{k}={v}" for k, v in EXPLODING.items()]
    assert main(["train", path, *overrides]) == 3
    assert "training diverged at step" in capsys.readouterr().err
    summary = strict_json(os.path.join(out, "summary.json"))
    assert summary["status"] == "diverged" and summary["stage"] == 0 and summary["step"] == 4
    assert "gradient norm" in summary["reason"]
    assert not os.path.exists(os.path.join(out, "final"))  # no model that looks fine
    # saved while exploding: set aside, so that a resume does not continue from it
    assert sorted(os.listdir(os.path.join(out, "stage-0"))) == ["suspect-checkpoint-2"]
    assert not os.path.exists(os.path.join(out, ".rmt-peft.lock"))


@pytest.mark.slow
def test_rollback_to_the_stage_start_equals_a_run_at_the_lower_learning_rate(write_recipe, final_weights):
    # lr 1e3 explodes in stage 0 before any good save: the rollback rebuilds the initial weights and
    # trains again at 1e3 x 1e-4 = 0.1, which must give exactly a fresh run at lr 0.1
    changes = {**EXPLODING, "guard.on_divergence": "rollback", "guard.rollback_lr_factor": 1.0e-4,
               "curriculum.segments": [1]}
    rolled = load_recipe(write_recipe(changes, name="rolled.yaml"))
    summary = train_recipe(rolled, **QUIET)
    assert summary["status"] == "completed" and len(summary["rollbacks"]) == 1
    assert summary["rollbacks"][0]["rolled_back_to"] == "the start of stage 0"
    fresh = load_recipe(write_recipe({**changes, "training.learning_rate": 0.1}, name="fresh.yaml"))
    train_recipe(fresh, **QUIET)
    a, b = final_weights(rolled.output_dir), final_weights(fresh.output_dir)
    for name in a:
        assert torch.isfinite(a[name]).all()
        torch.testing.assert_close(a[name], b[name], msg=name)


@pytest.mark.slow
def test_rollback_to_a_checkpoint_resumes_it_with_half_the_learning_rate(write_recipe, monkeypatch):
    changes = {"curriculum.segments": [1, 2], "guard.on_divergence": "rollback"}
    original = RMTTrainer.training_step
    fired = []

    def nan_once(self, model, inputs, num_items_in_batch=None):
        loss = original(self, model, inputs, num_items_in_batch)
        if "stage-1" in self.args.output_dir and self.state.global_step == 2 and not fired:
            fired.append(True)  # step 3 of stage 1 sees a NaN loss, once
            self.guard.note_loss(math.nan)
        return loss

    monkeypatch.setattr(RMTTrainer, "training_step", nan_once)
    recipe = load_recipe(write_recipe(changes))
    summary = train_recipe(recipe, **QUIET)
    assert fired and summary["status"] == "completed"
    assert summary["rollbacks"][0]["rolled_back_to"].endswith(os.path.join("stage-1", "checkpoint-2"))
    with open(os.path.join(recipe.output_dir, "stage-1", "checkpoint-4", "trainer_state.json")) as f:
        lrs = {e["step"]: e["learning_rate"] for e in json.load(f)["log_history"] if "learning_rate" in e}
    # linear decay over 4 steps from 1e-2: the lr logged at step 3 is 1e-2 x 2/4, halved by the rollback
    assert lrs[2] == pytest.approx(1.0e-2 * 3 / 4)
    assert lrs[3] == pytest.approx(1.0e-2 * 2 / 4 / 2)
    assert [s["steps"] for s in summary["stages"]] == [4, 4]
