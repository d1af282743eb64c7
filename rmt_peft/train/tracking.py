"""One training curve for the whole curriculum in TensorBoard, W&B and the other reporters.

Each curriculum stage is its own Trainer, whose step counter starts at 0. ``continue_curve``
wraps the stage Trainer's reporting callbacks (``report_to``: TensorBoardCallback,
WandbCallback, ...) so that what they log carries the run's global step (the steps of the
earlier stages plus the stage's own) and the stage as scalars (``curriculum_stage``,
``curriculum_num_segments``). TensorBoard writes every stage into one folder,
``OUTPUT_DIR/logs`` (one run; a resumed run continues it); W&B keeps one run until ``end_run``
(the 0-memory baseline then starts its own, as it has its own ``OUTPUT_DIR/baseline/logs``).
Only ``on_log`` sees the shifted step: checkpoint names and the Trainer's own state stay the
stage's.
"""
from __future__ import annotations

import copy
import os
import sys

LOG_DIR = "logs"


class ContinuedCurve:
    """A reporting callback seen through the run's global step (see the module docstring)."""

    def __init__(self, inner, steps_before: int, scalars: dict[str, float]):
        self.inner, self.steps_before, self.scalars = inner, steps_before, scalars

    def on_log(self, args, state, control, logs=None, **kwargs):
        state = copy.copy(state)
        state.global_step += self.steps_before
        return self.inner.on_log(args, state, control, logs={**(logs or {}), **self.scalars}, **kwargs)

    def __getattr__(self, name):  # every other event goes to the reporter unchanged
        return getattr(self.inner, name)


def continue_curve(trainer, output_dir: str, steps_before: int, stage: int, segments: list[int]) -> None:
    """Wrap ``trainer``'s reporting callbacks in place (see the module docstring)."""
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    reporters = tuple(INTEGRATION_TO_CALLBACK.values())
    scalars = {"curriculum_stage": stage, "curriculum_num_segments": max(segments)}
    callbacks = trainer.callback_handler.callbacks
    for i, callback in enumerate(callbacks):
        if isinstance(callback, reporters):
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = os.path.join(output_dir, LOG_DIR)  # else TENSORBOARD_LOGGING_DIR's
            callbacks[i] = ContinuedCurve(callback, steps_before, scalars)


def end_run() -> None:
    """Finish the W&B run of a finished training, so the next one in this process (the baseline)
    starts its own run instead of restarting the step counter inside this one."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
