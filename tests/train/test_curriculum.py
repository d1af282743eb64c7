"""The curriculum advances (step budget, metric threshold, plateau, the global step cap) and a run
killed mid-way resumes to exactly the losses of an uninterrupted run."""
import json
import os
import re
from types import SimpleNamespace

import pytest

from rmt_peft.memory import MemoryConfig
from rmt_peft.train.curriculum import (CurriculumState, StageCallback, StagePlan, first_of_last, levers_on,
                                       stage_budget, stage_memory, stage_plan)
from rmt_peft.recipe import Stage, load_recipe
from rmt_peft.recurrent import RMTModel
from rmt_peft.train.trainer import train_recipe


def evaluate(callback, values, metric):
    """Feed evaluation results; return the index of the evaluation that stopped the stage."""
    for i, value in enumerate(values):
        control = SimpleNamespace(should_training_stop=False)
        callback.on_evaluate(None, None, control, metrics={f"eval_{metric}": value})
        if control.should_training_stop:
            return i
    return None


def test_threshold_and_plateau_decide_when_a_stage_ends():
    accuracy = Stage(num_segments=2, max_steps=100, metric="accuracy", threshold=0.9)
    assert evaluate(StageCallback(accuracy, CurriculumState()), [0.2, 0.5, 0.95, 0.97], "accuracy") == 2
    loss = Stage(num_segments=2, max_steps=100, metric="eval_loss", patience=2, min_delta=0.01)
    state = CurriculumState()
    # improves, improves, then two evaluations within min_delta of the best: plateau at the 5th
    assert evaluate(StageCallback(loss, state), [3.0, 2.0, 1.5, 1.495, 1.6, 1.0], "loss") == 4
    assert "plateau" in state.stop_reason and state.best == 1.5


def test_stage_budget_is_capped_by_the_total_max_steps():
    assert stage_budget(Stage(max_steps=10), steps_before=0, total_max_steps=None) == 10
    assert stage_budget(Stage(max_steps=10), steps_before=25, total_max_steps=30) == 5
    assert stage_budget(Stage(max_steps=None), steps_before=25, total_max_steps=30) == 5
    assert stage_budget(Stage(max_steps=10), steps_before=30, total_max_steps=30) == 0


def test_the_last_two_of_seven_stages_are_the_levers_from_stage_5_of_a_recipe(write_recipe):
    """One rule for which stages train with the memory levers: the learning benchmark's "the last 2
    of 7 stages" (late2_*) and a recipe's levers_from_stage: 5 both mean stages 5 and 6 (0-based)."""
    expected = [False, False, False, False, False, True, True]
    assert first_of_last(7, 2) == 5
    assert [p.levers for p in stage_plan([1, 2, 3, 4, 5, 6, 7], 10, 1e-3, first_of_last(7, 2))] == expected
    recipe = load_recipe(write_recipe({"curriculum": {"segments": [1, 2, 3, 4, 5, 6, 7], "steps_per_stage": 1,
                                                      "levers_from_stage": 5}, "memory.memory_noise_std": 0.1}))
    cur = recipe.curriculum
    assert [levers_on(i, cur.levers_from_stage) for i in range(len(cur.stages))] == expected
    assert first_of_last(7, None) == 0  # no count: the levers in every stage, as levers_from_stage: 0


def test_a_stage_with_the_levers_off_trains_without_the_stability_loss_the_noise_the_cost_and_forced_writes():
    model = MemoryConfig(num_memory_tokens=4, segment_size=8, memory_kind="associative")
    levers = MemoryConfig(num_memory_tokens=4, segment_size=8, memory_kind="associative", memory_stability_weight=2.0,
                          memory_noise_std=0.1, associative_write_cost=0.01, associative_forced_write_rate=0.05,
                          associative_write_back_weight=0.3)
    on, off = stage_memory(model, levers, True), stage_memory(model, levers, False)
    assert (on.memory_stability_weight, on.memory_noise_std, on.associative_write_cost,
            on.associative_forced_write_rate, on.associative_write_back_weight) == (2.0, 0.1, 0.01, 0.05, 0.3)
    assert (off.memory_stability_weight, off.memory_noise_std, off.associative_write_cost,
            off.associative_forced_write_rate, off.associative_write_back_weight) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert on.num_memory_tokens == off.num_memory_tokens == 4


def test_the_lever_stages_take_their_own_steps_and_rate_and_the_first_ramps_the_levers_in():
    """Stages of 1, 2, 4, 8 segments, the levers from stage 2 on: stages 0-1 run 3 steps, 2-3 run 7
    at the lever rate; the rate halves per stage before; only stage 2 ramps."""
    plan = stage_plan([1, 2, 4, 8], 3, 1e-3, 2, lever_steps=7, lever_lr=4e-4, lr_decay=0.5, ramp_steps=5)
    assert plan == [StagePlan(1, 3, 1e-3, False), StagePlan(2, 3, 5e-4, False),
                    StagePlan(4, 7, 1e-4, True, 5), StagePlan(8, 7, 5e-5, True)]
    # without lever settings every stage alike; the levers from stage 0 ramp in at the first
    assert stage_plan([1, 2], 4, 1e-3, ramp_steps=2) == [StagePlan(1, 4, 1e-3, True, 2), StagePlan(2, 4, 1e-3, True)]


@pytest.mark.slow
def test_curriculum_advances_on_threshold_and_stops_at_the_step_cap(write_recipe):
    stages = [{"num_segments": 1, "max_steps": 4, "metric": "eval_loss", "threshold": 100.0},
              {"num_segments": 2, "max_steps": 4}, {"num_segments": 3, "max_steps": 4}]
    recipe = load_recipe(write_recipe({"curriculum": {"stages": stages}, "training.max_steps": 6,
                                       "training.eval_strategy": "steps", "training.eval_steps": 2}))
    summary = train_recipe(recipe, log=lambda *_: None)
    steps = [(s["num_segments"], s["steps"]) for s in summary["stages"]]
    assert steps == [(1, 2), (2, 4)]  # stage 0 met its threshold at the first evaluation; 2 + 4 = cap
    assert "threshold" in summary["stages"][0]["reason"]
    on_disk = json.load(open(os.path.join(recipe.output_dir, "summary.json")))
    assert on_disk["eval"]["2"]["accuracy"] == summary["eval"]["2"]["accuracy"]
    assert os.path.exists(os.path.join(recipe.output_dir, "final", "memory.safetensors"))
    assert load_recipe(os.path.join(recipe.output_dir, "recipe.yaml")).to_dict()["training"]["max_steps"] == 6


def train_watching(monkeypatch, recipe, *log_keys: str):
    """Train ``recipe``: (each training forward's (memory config, output), the value of ``log_keys``
    in each training log, None where it is missing; a tuple of them for several keys)."""
    from transformers import Trainer


    steps, logged = [], []
    forward, log = RMTModel.forward, Trainer.log

    def spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            steps.append((self.memory_config, out))
        return out

    def log_spy(self, logs, *args, **kwargs):
        if "loss" in logs:
            values = tuple(logs.get(key) for key in log_keys)
            logged.append(values if len(values) > 1 else values[0])
        return log(self, logs, *args, **kwargs)

    monkeypatch.setattr(RMTModel, "forward", spy)
    monkeypatch.setattr(Trainer, "log", log_spy)
    train_recipe(recipe, log=lambda *_: None)
    return steps, logged


def test_memory_levers_apply_from_the_given_stage_on(write_recipe, monkeypatch):
    """Stage 0 trains with the stability loss and the noise off, stage 1 with the recipe's values
    (and its training log carries the memory's drift); the saved adapter keeps the recipe's
    memory config."""
    stages = [{"num_segments": 2, "max_steps": 2}, {"num_segments": 2, "max_steps": 3}]
    recipe = load_recipe(write_recipe({"curriculum": {"stages": stages, "levers_from_stage": 1},
                                       "memory.memory_stability_weight": 2.0, "memory.memory_noise_std": 0.1}))
    steps, logged = train_watching(monkeypatch, recipe, "memory_drift")
    assert [(c.memory_stability_weight, c.memory_noise_std) for c, _ in steps] == [(0.0, 0.0)] * 2 + [(2.0, 0.1)] * 3
    assert logged[:2] == [None, None] and len(logged) == 5 and all(d > 0 for d in logged[2:])
    saved = json.load(open(os.path.join(recipe.output_dir, "final", "memory_config.json")))
    assert (saved["memory_stability_weight"], saved["memory_noise_std"]) == (2.0, 0.1)


@pytest.mark.parametrize("lever", ["associative_forced_write_rate", "associative_write_back_weight"])
def test_forced_writes_or_the_write_back_loss_alone_are_a_lever_that_levers_from_stage_starts(write_recipe, lever):
    curriculum = {"segments": [1, 2], "steps_per_stage": 1, "levers_from_stage": 1}
    recipe = load_recipe(write_recipe({"curriculum": curriculum, "memory.memory_kind": "associative",
                                       "memory.associative_key_size": 8, f"memory.{lever}": 0.05}))
    assert getattr(recipe.memory, lever) == 0.05 and recipe.curriculum.levers_from_stage == 1


@pytest.mark.parametrize("levers_from_stage,noise,message", [
    (1, 0.0, "curriculum.levers_from_stage=1 has no effect"),
    (2, 0.1, "curriculum.levers_from_stage=2: expected an integer from 0 to 1"),
])
def test_bad_levers_from_stage_names_the_field(write_recipe, levers_from_stage, noise, message):
    from rmt_peft.recipe import RecipeError

    curriculum = {"segments": [1, 2], "steps_per_stage": 1, "levers_from_stage": levers_from_stage}
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(write_recipe({"curriculum": curriculum, "memory.memory_noise_std": noise}))


def test_the_associative_write_cost_and_write_back_loss_are_levers_that_levers_from_stage_starts(write_recipe,
                                                                                                  monkeypatch):
    """rmt-peft train with an associative memory and the write cost and write-back loss as its
    levers: stage 0 trains without them (nothing measured), stage 1 with them, in the loss the
    Trainer steps on; the training log (one step a log) carries each step's mean write gate and
    write-back loss from stage 1 on."""
    stages = [{"num_segments": 2, "max_steps": 2}, {"num_segments": 2, "max_steps": 3}]
    recipe = load_recipe(write_recipe({"curriculum": {"stages": stages, "levers_from_stage": 1},
                                       "memory.memory_kind": "associative", "memory.associative_key_size": 8,
                                       "memory.associative_write_cost": 0.1,
                                       "memory.associative_write_back_weight": 0.2,
                                       "memory.associative_normalizer_floor": True}))
    steps, logged = train_watching(monkeypatch, recipe, "write_gate", "write_back")
    assert [(c.associative_write_cost, c.associative_write_back_weight, out.write_gate is not None,
             out.write_back is not None) for c, out in steps] == [(0.0, 0.0, False, False)] * 2 + [(0.1, 0.2, True, True)] * 3
    gates = [(float(out.write_gate), float(out.write_back)) for _, out in steps[2:]]
    assert logged[:2] == [(None, None)] * 2
    assert [x for pair in logged[2:] for x in pair] == pytest.approx([x for pair in gates for x in pair], abs=1e-6)
    assert all(0 < g < 1 and 0 < b < 2 for g, b in gates)
    saved = json.load(open(os.path.join(recipe.output_dir, "final", "memory_config.json")))
    assert (saved["memory_kind"], saved["associative_write_cost"]) == ("associative", 0.1)
    # the floor (the detect recipe's setting) is built into the trained memory and comes back with it
    assert all(c.associative_normalizer_floor for c, _ in steps) and saved["associative_normalizer_floor"]
    assert RMTModel.from_pretrained(os.path.join(recipe.output_dir, "final")).memory.associative.normalizer_floor


class Killed(Exception):
    pass


def losses(output_dir, stage):
    with open(os.path.join(output_dir, f"stage-{stage}", "checkpoint-4", "trainer_state.json")) as f:
        return [entry["loss"] for entry in json.load(f)["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_a_killed_run_resumes_exactly(write_recipe, monkeypatch):
    # linear decay and AdamW: a resume that lost the scheduler or optimizer state shows in the losses
    changes = {"training.save_strategy": "steps", "training.save_steps": 2, "training.lr_scheduler_type": "linear",
               "training.learning_rate": 1.0e-2}
    full = load_recipe(write_recipe(changes, "full.yaml"))
    full_dir = full.output_dir
    summary = train_recipe(full, log=lambda *_: None)
    reference = losses(full_dir, 0), losses(full_dir, 1)
    assert len(reference[1]) == 4 and reference[1][0] != reference[1][-1]

    for kill_stage, kill_step in ((1, 3), (1, 1)):  # after a checkpoint inside stage 1; right after stage 0
        killed = load_recipe(write_recipe(changes, "killed.yaml"))
        killed.training["output_dir"] = f"{full_dir}-killed-{kill_step}"

        def on_step_end(self, args, state, control, **kwargs):
            if self.state.stage == kill_stage and state.global_step == kill_step:
                raise Killed()

        with monkeypatch.context() as patch:
            patch.setattr(StageCallback, "on_step_end", on_step_end, raising=False)
            with pytest.raises(Killed):
                train_recipe(killed, log=lambda *_: None)
        killed.training["resume_from_checkpoint"] = True
        resumed = train_recipe(killed, log=lambda *_: None)
        assert losses(killed.output_dir, 0) == reference[0]
        assert losses(killed.output_dir, 1) == pytest.approx(reference[1], rel=1e-6, abs=1e-7)
        assert resumed["eval"]["2"]["loss"] == pytest.approx(summary["eval"]["2"]["loss"], rel=1e-6)
