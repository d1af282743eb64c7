"""Keep the weights whose memory lasts longest, judged on inputs longer than the curriculum's.

Runs of one memory setting differ in how far their memory generalises in length, and so do the
checkpoints of one run: on the learning benchmark (BENCHMARKS.md, issue 11) the last weights of
10 detect runs scored 0.67-1.00 at 4,096 segments, the best of each run's checkpoints by accuracy
at 64 segments on held-out samples 0.90-1.00. With ``curriculum.keep_best_segments``, every
evaluation during training in the stages from ``curriculum.keep_best_from_stage`` on also measures
answer accuracy on ``keep_best_samples`` held-out samples of that many segments (metrics
``keep_best_<n>_accuracy`` / ``_loss`` in the logs). The best weights so far (the latest among
ties) are saved in ``OUTPUT_DIR/best/`` with their record (stage, step, accuracy: ``runs.save_best``),
and become ``final/`` when training ends.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainerCallback

from .. import runs


def replaces_kept(accuracy: float, kept: float | None) -> bool:
    """Whether weights scoring ``accuracy`` replace the kept ones (scoring ``kept``; None: none kept
    yet): at least as good, so ties go to the later weights. The learning benchmark keeps by it too."""
    return kept is None or accuracy >= kept


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
        if replaces_kept(accuracy, None if self.kept.record is None else self.kept.record["accuracy"]):
            self.save(record, args.should_save)
            self.kept.record = record

    def save(self, record: dict, should_save: bool) -> None:
        """The weights and their record into best/, swapped in whole (``runs.save_best``)."""
        runs.save_best(self.output_dir, self.trainer.save_model, record, should_save)
