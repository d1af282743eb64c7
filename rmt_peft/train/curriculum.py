"""The segment curriculum of the paper: train on 1 segment, then 2, 3, ... each stage starting
from the previous stage's weights.

A stage ends at its step budget, or earlier when its metric (from evaluations during training)
reaches a threshold or stops improving (plateau). ``StageCallback`` makes that decision inside
the Hugging Face Trainer and writes the curriculum position (stage, steps of earlier stages,
plateau counters) into every checkpoint (``runs.write_state``), beside the optimizer, scheduler
and RNG states the Trainer saves itself, so a resume continues a run exactly.

Which stages train with the memory levers is one rule (``levers_on``: from stage k on), for a
recipe's ``curriculum.levers_from_stage`` and for the learning benchmark, whose "the last n
stages" is the same k (``first_of_last``); ``stage_plan`` lays out a curriculum given as segment
counts (the benchmark's) by that rule.

Where the stages, checkpoints and ends lie, and which save a resume takes: ``rmt_peft.runs``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field

from transformers import TrainerCallback

from .. import runs
from ..memory import MemoryConfig
from ..recipe import Stage


def first_of_last(num_stages: int, last: int | None) -> int:
    """The first (0-based) of the last ``last`` of ``num_stages`` stages; None: all of them (0).
    "The last n stages" as the "from stage k on" of ``levers_on``."""
    return 0 if last is None else num_stages - last


def levers_on(stage: int, levers_from_stage: int) -> bool:
    """Whether stage ``stage`` (0-based) trains with the memory levers: from ``levers_from_stage`` on.
    The one rule of ``rmt-peft train`` and of the learning benchmark."""
    return stage >= levers_from_stage


def stage_memory(memory: MemoryConfig, levers: MemoryConfig, on: bool) -> MemoryConfig:
    """The memory config a stage trains with: ``memory`` (the model's) with the stability weight, the
    training noise, the associative write cost, forced writes and write-back loss of ``levers`` (the
    recipe's) when ``on`` (``levers_on``), and all off when not. Only training changes: evaluation
    uses none of them."""
    return dataclasses.replace(memory, memory_stability_weight=levers.memory_stability_weight if on else 0.0,
                               memory_noise_std=levers.memory_noise_std if on else 0.0,
                               associative_write_cost=levers.associative_write_cost if on else 0.0,
                               associative_forced_write_rate=levers.associative_forced_write_rate if on else 0.0,
                               associative_write_back_weight=levers.associative_write_back_weight if on else 0.0)


@dataclass(frozen=True)
class StagePlan:
    """One stage of ``stage_plan``: inputs of up to ``segments`` segments, ``steps`` optimizer steps
    warming up to ``peak_lr``, and the memory levers on or off (rising over the first ``ramp_steps``
    steps)."""

    segments: int
    steps: int
    peak_lr: float
    levers: bool
    ramp_steps: int = 0


def stage_plan(segments: list[int], steps: int, learning_rate: float, levers_from_stage: int = 0, *,
               lever_steps: int | None = None, lever_lr: float | None = None, lr_decay: float = 1.0,
               ramp_steps: int = 0) -> list[StagePlan]:
    """A stage per segment count, each ``steps`` steps at ``learning_rate`` times ``lr_decay`` per
    stage before it. The lever stages (``levers_on``) take ``lever_steps`` steps and ``lever_lr`` (decayed
    alike) when given, and the first of them ramps the levers in over ``ramp_steps`` steps."""
    plan = []
    for index, count in enumerate(segments):
        on = levers_on(index, levers_from_stage)
        lr = lever_lr if on and lever_lr else learning_rate
        plan.append(StagePlan(count, (lever_steps or steps) if on else steps, lr * lr_decay ** index, on,
                              ramp_steps if index == levers_from_stage else 0))
    return plan


@dataclass
class CurriculumState:
    """Where a run is: ``stage`` (index), ``steps_before`` (optimizer steps of the stages before
    it, for the global ``training.max_steps`` cap), the finished stages' records, the plateau
    tracker of the current stage, the divergence guard's rollbacks so far (``lr_scale``: the
    learning rate's factor after them, kept by a resume) and the current stage's summed step losses
    (``loss_sum``: a resumed stage's train_loss averages all its steps, not only those after the resume)."""

    stage: int = 0
    steps_before: int = 0
    finished: list[dict] = field(default_factory=list)
    best: float | None = None
    bad_evals: int = 0
    stop_reason: str | None = None
    lr_scale: float = 1.0
    rollbacks: list[dict] = field(default_factory=list)
    loss_sum: float = 0.0  # the current stage's step losses summed up to this save: its train_loss after a resume

    def save(self, folder: str) -> None:
        runs.write_state(folder, asdict(self))

    @classmethod
    def load(cls, folder: str) -> "CurriculumState":
        """The state saved in ``folder``; a UserError naming the file when it is damaged."""
        return runs.read_state(folder, cls)


def stage_budget(stage: Stage, steps_before: int, total_max_steps: int | None) -> int:
    """Optimizer steps stage may take: its own budget, capped by what ``training.max_steps`` leaves."""
    left = None if total_max_steps is None or total_max_steps <= 0 else total_max_steps - steps_before
    budgets = [b for b in (stage.max_steps, left) if b is not None]
    return max(0, min(budgets))


def metric_improved(metric: str, value: float, best: float | None, min_delta: float) -> bool:
    if best is None:
        return True
    if lower_is_better(metric):
        return value < best - min_delta
    return value > best + min_delta


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "perplexity" in metric


class StageCallback(TrainerCallback):
    """Stops the stage's Trainer when the stage has converged, and records the curriculum position
    in every checkpoint."""

    def __init__(self, stage: Stage, state: CurriculumState):
        self.stage = stage
        self.state = state
        self.loss_before = state.loss_sum  # the steps before a resume
        self.trainer = None  # set once the stage's Trainer exists: its step losses go into every save

    def loss_sum(self) -> float:
        """The stage's step losses summed so far, those before a resume included."""
        return self.loss_before + (self.trainer.step_loss_sum() if self.trainer is not None else 0.0)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        name = self.stage.metric
        if name is None or not metrics or not any(k.startswith("eval_") for k in metrics):
            return  # not an evaluation during training (e.g. the final one, prefixed final_<n>)
        key = name if name in metrics else f"eval_{name}"
        if key not in metrics:
            raise KeyError(f"curriculum metric {name!r} is not among the evaluation metrics {sorted(metrics)}")
        value = float(metrics[key])
        threshold = self.stage.threshold
        if threshold is not None and not math.isnan(value):
            reached = value <= threshold if lower_is_better(name) else value >= threshold
            if reached:
                self.state.stop_reason = f"{name}={value:.4g} reached threshold {threshold}"
                control.should_training_stop = True
                return
        if self.stage.patience is not None:
            if metric_improved(name, value, self.state.best, self.stage.min_delta):
                self.state.best, self.state.bad_evals = value, 0
            else:
                self.state.bad_evals += 1
                if self.state.bad_evals >= self.stage.patience:
                    self.state.stop_reason = (f"{name} plateaued at {self.state.best:.4g} for "
                                              f"{self.stage.patience} evaluations")
                    control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        self.state.loss_sum = self.loss_sum()
        if args.should_save:
            self.state.save(runs.checkpoint_dir(args.output_dir, state.global_step))
