"""One training curve for the whole curriculum in TensorBoard, W&B and the other reporters.

Each curriculum stage is its own Trainer, whose step counter starts at 0. ``continue_curve``
wraps the stage Trainer's reporting callbacks (``report_to``: TensorBoardCallback,
WandbCallback, ...) so that what they log carries the run's global step (the steps of the
earlier stages plus the stage's own) and the stage as scalars (``curriculum_stage``,
``curriculum_num_segments``). TensorBoard writes every stage into one folder,
``OUTPUT_DIR/logs`` (one run; a resumed run continues it); W&B keeps one run until ``end_run``
(the 0-memory baseline then starts its own, as it has its own ``OUTPUT_DIR/baseline/logs``).
Only ``on_log`` sees the shifted step: checkpoint names and the Trainer's own state stay the
stage's. ``epoch`` is shifted the same way (the epochs of the earlier stages plus the stage's
own), so it grows across the run instead of restarting at 0 in each stage; ``total_flos`` is not
reported (the Trainer cannot count an RMTModel's FLOPs and would report 0).

The final evaluation (one per number of segments) reaches the reporters as one group, not as a
one-point scalar per length and metric: ``final_evaluation`` keeps the Trainer's per-length logs
away from the reporters and the log, and ``log_final_evaluation`` writes the results once: in
TensorBoard as ``final_eval/accuracy`` and ``final_eval/loss`` with the number of segments on the
step axis (a curve of accuracy against input length) and the table as text.
"""
from __future__ import annotations

import contextlib
import copy
import sys

from .. import runs


class ContinuedCurve:
    """A reporting callback seen through the run's global step (see the module docstring)."""

    def __init__(self, inner, steps_before: int, scalars: dict[str, float], epochs_before: float = 0.0):
        self.inner, self.steps_before, self.scalars, self.epochs_before = inner, steps_before, scalars, epochs_before

    def on_log(self, args, state, control, logs=None, **kwargs):
        state = copy.copy(state)
        state.global_step += self.steps_before
        logs = {k: v for k, v in (logs or {}).items() if k != "total_flos"}
        if "epoch" in logs:
            logs["epoch"] += self.epochs_before
        return self.inner.on_log(args, state, control, logs={**logs, **self.scalars}, **kwargs)

    def __getattr__(self, name):  # every other event goes to the reporter unchanged
        return getattr(self.inner, name)


def continue_curve(trainer, output_dir: str, steps_before: int, stage: int, segments: list[int],
                   epochs_before: float = 0.0) -> None:
    """Wrap ``trainer``'s reporting callbacks in place (see the module docstring)."""
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    reporters = tuple(INTEGRATION_TO_CALLBACK.values())
    scalars = {"curriculum_stage": stage, "curriculum_num_segments": max(segments)}
    callbacks = trainer.callback_handler.callbacks
    for i, callback in enumerate(callbacks):
        if isinstance(callback, reporters):
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = runs.log_dir(output_dir)  # else TENSORBOARD_LOGGING_DIR's
            callbacks[i] = ContinuedCurve(callback, steps_before, scalars, epochs_before)


@contextlib.contextmanager
def final_evaluation(trainer):
    """Inside: the Trainer's evaluations reach neither the reporters nor the log (see the module
    docstring); their results are reported once, by ``log_final_evaluation``."""
    callbacks = trainer.callback_handler.callbacks
    kept = list(callbacks)
    callbacks[:] = [c for c in callbacks if not isinstance(c, ContinuedCurve) and not hasattr(c, "training_bar")]
    try:
        yield
    finally:
        callbacks[:] = kept


def log_final_evaluation(report_to, output_dir: str, evaluation: dict[str, dict], table: str) -> None:
    """The final evaluation in TensorBoard (when ``report_to`` has it): accuracy and loss against
    the number of segments, and the result table as text, in ``OUTPUT_DIR/logs``."""
    if "tensorboard" not in (report_to or []):
        return
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=runs.log_dir(output_dir))
    try:
        for segments, metrics in evaluation.items():
            if not segments.isdigit():  # trl's held-out split ("all"): in the table only
                continue
            for name in ("accuracy", "loss"):
                if metrics.get(name) is not None:
                    writer.add_scalar(f"final_eval/{name}", metrics[name], global_step=int(segments))
        writer.add_text("final_eval/table", "    " + table.replace("\n", "\n    "))  # markdown: a code block
    finally:
        writer.close()


def end_run() -> None:
    """Finish the W&B run of a finished training, so the next one in this process (the baseline)
    starts its own run instead of restarting the step counter inside this one."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
