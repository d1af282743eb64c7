"""Keep the weights whose memory lasts longest, judged on inputs longer than the curriculum's.

Runs of one memory setting differ in how far their memory generalises in length, and so do the
checkpoints of one run: on the learning benchmark (BENCHMARKS.md, issue 11) the last weights of
10 detect runs scored 0.67-1.00 at 4,096 segments, the best of each run's checkpoints by accuracy
at 64 segments on held-out samples 0.90-1.00. With ``curriculum.keep_best_segments``, every
evaluation during training in the stages from ``curriculum.keep_best_from_stage`` on also measures
answer accuracy on ``keep_best_samples`` held-out samples of that many segments (metrics
``keep_best_<n>_accuracy`` / ``_loss`` in the logs). The best weights so far (the latest among
ties) are saved in ``OUTPUT_DIR/best/`` with ``kept.json`` (stage, step, accuracy), and become
``final/`` when training ends.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

from transformers import TrainerCallback

from ..errors import UserError
from ..fileio import TEMP_MARK, write_json
from ..runs import BEST_DIR  # the run folder's names live in runs.py
KEPT_FILE = "kept.json"


def best_dir(output_dir: str) -> str:
    return os.path.join(output_dir, BEST_DIR)


def read_kept(output_dir: str) -> dict | None:
    """The record of the weights in ``OUTPUT_DIR/best/``, or None when there are none yet."""
    path = os.path.join(best_dir(output_dir), KEPT_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is damaged ({type(err).__name__}: {err}); delete {best_dir(output_dir)} "
                        f"(its weights are scored again at the next evaluation)") from err


@dataclass
class Kept:
    """What the stages' callbacks share: the record of the weights in best/ (at a resume, the one
    on disk) and every score of this process. Every rank holds the same values (an evaluation's
    accuracy is gathered over the ranks), so all of them agree on when to save, which under
    ZeRO-3 is a collective."""

    record: dict | None = None
    scores: list[dict] = field(default_factory=list)


class KeepBest(TrainerCallback):
    """After each evaluation during training, score the weights on the long held-out samples and
    save them to ``best/`` when they score at least as well as the weights kept so far.
    ``trainer`` is set once the stage's Trainer exists (it evaluates and saves)."""

    def __init__(self, output_dir: str, dataset, num_segments: int, stage: int, steps_before: int, kept: Kept):
        self.output_dir, self.dataset, self.num_segments = output_dir, dataset, num_segments
        self.stage, self.steps_before, self.kept = stage, steps_before, kept
        self.trainer = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or not any(k.startswith("eval_") for k in metrics):
            return  # not the stage's evaluation: our own (keep_best_<n>_...) or the final one
        prefix = f"keep_best_{self.num_segments}"
        accuracy = float(self.trainer.evaluate(eval_dataset=self.dataset, metric_key_prefix=prefix)[f"{prefix}_accuracy"])
        record = {"stage": self.stage, "step": self.steps_before + state.global_step,
                  "num_segments": self.num_segments, "accuracy": accuracy}
        self.kept.scores.append(record)
        if self.kept.record is None or accuracy >= self.kept.record["accuracy"]:
            self.save(record, args.should_save)
            self.kept.record = record

    def save(self, record: dict, should_save: bool) -> None:
        """Write the weights and kept.json to a temporary folder, then swap it in for best/: a
        kill leaves the old best/ or the new one (or, between the two renames, none: the next
        start removes the temporary folders and scoring begins again)."""
        final = best_dir(self.output_dir)
        partial = os.path.join(self.output_dir, f".{BEST_DIR}{TEMP_MARK}new")
        self.trainer.save_model(partial)  # every rank: under ZeRO-3 the save gathers the weights
        if not should_save:
            return
        write_json(os.path.join(partial, KEPT_FILE), record)
        old = os.path.join(self.output_dir, f".{BEST_DIR}{TEMP_MARK}old")
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
