"""The divergence guard: a run that breaks says so instead of ending with a broken model.

Every optimizer step is checked before the optimizer applies it: a non-finite loss or gradient
norm, or a gradient norm above ``guard.spike_factor`` x its running level for ``guard.spike_steps``
steps in a row, raises ``TrainingDiverged``. The weights in memory are then still those of the
last applied step, and nothing broken has been saved (checkpoints are written after a step's
checks). ``train_recipe`` either stops the run (``guard.on_divergence: stop``, the default:
summary.json records ``status: diverged``, the command exits non-zero) or rolls the stage back to
its last good checkpoint with the learning rate times ``guard.rollback_lr_factor``.

The running level is an exponential average (about ten steps long) of the gradient norms that
were not spikes, started afresh in each stage (a stage with more segments may legitimately run
higher). A norm that grows gradually moves the level along; only a sudden jump that lasts counts.
Cost: one host sync per optimizer step, reading the step's losses and gradient norm together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import TrainingDiverged

LEVEL_DECAY = 0.9  # weight of the old level in the running average of gradient norms


def diverged(reason: str, step: int, first_bad_step: int | None = None) -> TrainingDiverged:
    """A TrainingDiverged carrying ``step`` (the optimizer step that broke, counted in the stage)
    and ``first_bad_step`` (the first step whose update is suspect: checkpoints before it are good)."""
    err = TrainingDiverged(f"training diverged at step {step}: {reason}")
    err.reason, err.step = reason, step
    err.first_bad_step = step if first_bad_step is None else first_bad_step
    return err


@dataclass
class DivergenceGuard:
    """The state of the checks for one stage (a Trainer): ``note_loss`` per micro-batch, then
    ``check_step`` per optimizer step (before the optimizer) raises ``TrainingDiverged``. Raising
    only there keeps the ranks of a distributed run together: a NaN loss on one rank makes the
    all-reduced gradient norm NaN on every rank, so every rank stops at the same step."""

    spike_factor: float | None = 20.0
    # 100, not 20: a converged memory task's loss spikes pass within 20-100 steps (docs/training.md)
    spike_steps: int = 100
    level: float | None = None
    spikes: int = 0
    spike_start: int | None = None
    losses: list = field(default_factory=list)  # the step's micro-batch losses, read in check_step

    def note_loss(self, loss) -> None:
        """Keep a micro-batch's loss (a tensor stays on its device until ``check_step``)."""
        self.losses.append(loss.detach() if isinstance(loss, torch.Tensor) else float(loss))

    def check_step(self, norm, step: int) -> None:
        """Check the step's losses and its gradient norm (a tensor, a float or None), in one sync."""
        items = [*self.losses, norm]
        self.losses = []
        tensors = [x for x in items if isinstance(x, torch.Tensor)]
        if tensors:  # everything still on the device, read at once
            read = iter(torch.stack([t.to(tensors[0].device, torch.float32).reshape(()) for t in tensors]).tolist())
            items = [next(read) if isinstance(x, torch.Tensor) else x for x in items]
        *losses, norm = items
        bad = [loss for loss in losses if not math.isfinite(loss)]
        if bad:
            raise diverged(f"the loss is {bad[0]}", step)
        if norm is not None:
            self.check_grad_norm(float(norm), step)

    def check_grad_norm(self, norm: float, step: int) -> None:
        if not math.isfinite(norm):
            raise diverged(f"the gradient norm is {norm}", step)
        if self.spike_factor is None or self.level is None:
            self._update(norm)
            return
        if norm > self.spike_factor * self.level:
            self.spikes += 1
            self.spike_start = step if self.spikes == 1 else self.spike_start
            if self.spikes >= self.spike_steps:
                raise diverged(f"the gradient norm ({norm:.4g}) stayed above {self.spike_factor:g} x its running "
                               f"level ({self.level:.4g}) for {self.spikes} steps", step, self.spike_start)
            return
        self.spikes, self.spike_start = 0, None
        self._update(norm)

    def _update(self, norm: float) -> None:
        self.level = norm if self.level is None else LEVEL_DECAY * self.level + (1 - LEVEL_DECAY) * norm


def set_base_learning_rate(optimizer, scheduler, lr: float) -> None:
    """Make ``lr`` the base learning rate of a (resumed) optimizer and its schedule, keeping the
    schedule's position: a rollback resumes a checkpoint whose saved state holds the old rate."""
    for group in optimizer.param_groups:
        old = group.get("initial_lr", group["lr"])
        group["lr"] = group["lr"] * lr / old if old else lr
        if "initial_lr" in group:
            group["initial_lr"] = lr
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    if hasattr(scheduler, "_last_lr"):  # what the Trainer logs as the step's learning rate
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
