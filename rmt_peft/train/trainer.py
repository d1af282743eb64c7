"""The curriculum run: a recipe in, an adapter and a summary out, on Hugging Face's Trainer.

``CurriculumRun`` reads top-down in its phases: ``resume`` (may the run start in its output
folder, and where does it go on), ``setup`` (the model, tokenizer and collator, built once the
first TrainingArguments exist), ``run_stage`` (one Trainer per stage on the same model, so each
stage starts from the previous stage's weights with a fresh optimizer and schedule; after a
divergence ``rollback`` picks where the stage goes on) and ``finish`` (final/, the final
evaluation per number of segments, summary.json). The Trainer is the step engine (engine.py);
the run folder's names and rules are ``rmt_peft.runs``'s: every file is written atomically, a
resume continues exactly where the run stopped, in any stage, and the divergence guard
(guard.py) checks every optimizer step. ``run`` adds the 0-memory baseline of ``eval.baseline``
and the model card.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
import time

import torch
from safetensors import SafetensorError

from .. import runs
from ..card import write_model_card
from ..env import versions
from ..errors import TrainingDiverged, UserError
from ..fileio import disk_error, remove_temp_files
from ..log import is_main_process, trainer_output
from ..recipe import Recipe, stage_segments
from .arguments import training_arguments
from .build import build_model, build_tokenizer
from .curriculum import CurriculumState, StageCallback, levers_on, stage_budget, stage_memory
from .datasets import Collator, build_dataset, check_stage_data, final_segments
from .engine import load_trainable, release_deepspeed, save_adapter, stage_trainer
from .guard import DivergenceGuard
from .keep_best import Kept, KeepBest
from .lock import RunLock
from .tracking import continue_curve, end_run, final_evaluation, log_final_evaluation

TORCH_SAVE_FAILURES = ("unexpected pos", "file write failed", "No space left")  # torch.save's zip writer


@dataclasses.dataclass
class ResumePoint:
    """Where a run goes on: ``state`` (the stage to run next); ``checkpoint``: a Trainer checkpoint
    inside that stage (or None); ``weights``: the folder to load weights from before the stage
    starts (the previous stage's end)."""

    state: CurriculumState
    checkpoint: str | None = None
    weights: str | None = None

    @classmethod
    def at(cls, folder: str) -> "ResumePoint":
        """The point a saved checkpoint or stage end/ marks."""
        where = "weights" if runs.is_stage_end(folder) else "checkpoint"
        return cls(state=CurriculumState.load(folder), **{where: folder})


class CurriculumRun:
    """One run of a recipe's curriculum in its output folder (see the module docstring). The
    state a resume needs is ``self.state`` (saved in every checkpoint); the rest lives here for
    the run: the model, tokenizer and collator once set up, the current stage's Trainer, and
    the best weights' record of ``curriculum.keep_best_segments``."""

    def __init__(self, recipe: Recipe, log=print):
        self.recipe = recipe
        self.log = log
        self.out = recipe.output_dir
        self.seed = recipe.keys.seed
        self.started = time.time()
        self.point: ResumePoint | None = None
        self.state = CurriculumState()
        self.kept: Kept | None = None
        self.model = self.tokenizer = self.collator = self.trainer = None

    def train(self) -> dict:
        self.resume()
        for index in range(self.state.stage, len(self.recipe.curriculum.stages)):
            if not self.run_stage(index):
                break
        return self.finish()

    # -- the phases -----------------------------------------------------------------------
    def resume(self) -> None:
        """Check the output folder (on every rank, before any rank writes), remove what killed
        writers left, and find where the run goes on: a given checkpoint, the furthest point of
        an earlier run (``training.resume_from_checkpoint``), or the start."""
        resume = self.recipe.keys.resume
        if not runs.check_start(self.out, bool(resume)) and resume is True:
            resume = None  # a folder a killed first start left: nothing to resume, start afresh
        if is_main_process():
            for path in remove_temp_files(self.out):
                self.log(f"removed {path}, left by an interrupted write")
        if isinstance(resume, str):  # a given checkpoint (or a stage's end/ folder)
            problem = runs.damage(resume, CurriculumState)
            if problem is not None:
                raise UserError(f"training.resume_from_checkpoint={resume!r}: {problem}")
            self.point = ResumePoint.at(resume)
        elif resume:
            found = runs.find_resume_point(self.out, len(self.recipe.curriculum.stages), self.log, CurriculumState)
            self.point = ResumePoint.at(found) if found is not None else ResumePoint(CurriculumState())
        # A copy: the stages advance `state`, while only the stage the run stopped in resumes
        # from point.checkpoint (the later stages start from the previous stage's end).
        self.state = copy.deepcopy(self.point.state) if self.point else CurriculumState()
        if self.recipe.curriculum.keep_best_segments:
            self.kept = Kept(runs.read_kept(self.out))

    def setup(self, args) -> None:
        """The model (with the weights the run resumes from), tokenizer and collator, built once the
        first TrainingArguments exist: under ZeRO-3 they make transformers partition the backbone
        while it loads (deepspeed.zero.Init). recipe.yaml is written first, once every rank has
        checked the folder (hence the barrier)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if args.should_save:
            runs.write_recipe(self.out, self.recipe.to_yaml())
        self.model = build_model(self.recipe, self.seed)
        if self.point is not None and self.point.weights:
            load_trainable(self.model, self.point.weights)
        self.tokenizer = build_tokenizer(self.recipe)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.model.config, "pad_token_id", None) or 0
        self.collator = Collator(pad, self.recipe.data.padding_side)

    def run_stage(self, index: int) -> bool:
        """Train stage ``index`` to its end (again from a good save after each rollback) and save
        its end/; False when training.max_steps leaves it no step."""
        stage, total = self.recipe.curriculum.stages[index], self.recipe.keys.max_steps
        budget = stage_budget(stage, self.state.steps_before, total)
        if budget == 0:
            self.log(f"stage {index}: no steps left under training.max_steps={total}; stopping the curriculum")
            return False
        segments = stage_segments(stage)
        self.log(f"stage {index + 1} of {len(self.recipe.curriculum.stages)} "
                 f"({os.path.basename(runs.stage_dir(self.out, index))}): {segments} segment(s), up to {budget} steps")
        point = self.point
        checkpoint = point.checkpoint if point and point.checkpoint and index == point.state.stage else None
        while True:  # once, or again after each rollback of the divergence guard
            callback = self.start_stage(index, budget, segments)
            try:
                result = self.trainer.train(resume_from_checkpoint=checkpoint)
                break
            except TrainingDiverged as err:
                checkpoint = self.rollback(index, err)
        self.end_stage(index, result, callback, budget)
        return True

    def rollback(self, index: int, err: TrainingDiverged) -> str | None:
        """After the guard stopped stage ``index``: set aside the checkpoints saved after the
        divergence began, then either stop the run (``guard.on_divergence: stop``, or no rollback
        left: summary.json records it, ``err`` is raised) or return the checkpoint the stage goes on
        from (None: the stage's start) with the learning rate lowered."""
        guard, args = self.recipe.guard, self.trainer.args
        event = {"stage": index, "step": err.step, "reason": err.reason, "learning_rate": finite(args.learning_rate)}
        if args.should_save:
            runs.set_aside_suspect_checkpoints(runs.stage_dir(self.out, index), err.first_bad_step, self.log)
        if guard.on_divergence != "rollback" or len(self.state.rollbacks) >= guard.max_rollbacks:
            self.record_divergence(event, err.first_bad_step)
            raise err
        checkpoint = runs.latest_checkpoint(runs.stage_dir(self.out, index), self.log, err.first_bad_step,
                                            CurriculumState)
        self.state.lr_scale *= guard.rollback_lr_factor
        event["rolled_back_to"] = checkpoint or f"the start of stage {index}"
        self.state.rollbacks.append(event)
        self.log(f"warning: {err}; rolling back to {event['rolled_back_to']} with learning rate "
                 f"{args.learning_rate * guard.rollback_lr_factor:.3g}")
        if checkpoint is not None:
            saved = CurriculumState.load(checkpoint)
            self.state.best, self.state.bad_evals, self.state.loss_sum = saved.best, saved.bad_evals, saved.loss_sum
        elif index == 0:
            self.model = None  # the stage's start is the initialisation: build it again (same seed)
            self.state.loss_sum = 0.0
        else:
            load_trainable(self.model, runs.end_dir(self.out, index - 1))
            self.state.best, self.state.bad_evals, self.state.loss_sum = None, 0, 0.0
        return checkpoint

    def finish(self) -> dict:
        """final/ (the best weights of keep_best, else the last), the final evaluation and
        summary.json; the Trainer's DeepSpeed state is released for a later run in this process."""
        if self.trainer is None:  # nothing left to train (resumed after the last stage): evaluate what was trained
            segments = final_segments(self.recipe)
            args = training_arguments(self.recipe, runs.stage_dir(self.out, len(self.recipe.curriculum.stages)), 1,
                                      self.seed, max(segments))
            self.setup(args)
            self.trainer = stage_trainer(self.recipe, self.model, args, self.tokenizer, self.collator, segments, None)
        trainer, kept = self.trainer, self.kept
        if kept is not None and kept.record is not None:
            load_trainable(trainer.model, runs.best_dir(self.out))
            best, scores = kept.record, kept.scores
            last = f"; the last weights scored {scores[-1]['accuracy']:.3f}" if scores else ""
            self.log(f"{runs.FINAL_DIR}/ holds the best weights by accuracy at {best['num_segments']} segments: stage "
                     f"{best['stage']}, step {best['step']}, {best['accuracy']:.3f}{last}")
        # final/: what a user loads, not resume state
        save_adapter(trainer.model, runs.final_dir(self.out), trainer.base_model, trainer.args.should_save, False)
        evaluation = self.evaluate()
        summary = {"status": "completed", "num_memory_tokens": self.recipe.memory.num_memory_tokens,
                   "segment_size": self.recipe.memory.segment_size, "stages": self.state.finished,
                   "rollbacks": self.state.rollbacks, "eval": evaluation, **provenance(self.started)}
        if kept is not None:
            summary["keep_best"] = {"kept": kept.record, "scores": kept.scores}
        if is_main_process():  # one writer, as in run()
            runs.write_summary(self.out, summary)
        # A later run in this process (the baseline of eval.baseline) builds its own Trainer, which
        # accelerate refuses while this one's DeepSpeed state is alive.
        release_deepspeed(trainer)
        return summary

    # -- inside the phases ----------------------------------------------------------------
    def start_stage(self, index: int, budget: int, segments: list[int]) -> StageCallback:
        """The stage's Trainer (``self.trainer``) on the model, with the stage's memory levers, its
        callbacks, one training curve for all stages and the divergence guard."""
        recipe, state = self.recipe, self.state
        release_deepspeed(self.trainer)
        args = training_arguments(recipe, runs.stage_dir(self.out, index), budget, self.seed + index, max(segments))
        args.learning_rate *= state.lr_scale
        if self.model is None:
            self.setup(args)
            check_stage_data(recipe, self.tokenizer, index)
        self.model.memory_config = stage_memory(self.model.memory_config, recipe.memory,
                                                levers_on(index, recipe.curriculum.levers_from_stage))
        stage_callback = StageCallback(recipe.curriculum.stages[index], state)
        keeper = self.keep_best_callback(index)
        callbacks = [stage_callback] + ([keeper] if keeper is not None else [])
        trainer = stage_trainer(recipe, self.model, args, self.tokenizer, self.collator, segments, callbacks)
        for callback in callbacks:
            callback.trainer = trainer
        continue_curve(trainer, self.out, state.steps_before, index, segments,  # one curve for all stages
                       sum(f.get("epochs") or 0.0 for f in state.finished))
        trainer_output(trainer)  # log lines on stderr, bars on a terminal only; -q: neither
        trainer.guard = DivergenceGuard(recipe.guard.spike_factor, recipe.guard.spike_steps)
        trainer.base_learning_rate = args.learning_rate if state.lr_scale != 1 else None
        self.trainer = trainer
        return stage_callback

    def end_stage(self, index: int, result, callback: StageCallback, budget: int) -> None:
        """Record the finished stage, move the state to the next one and save the stage's end/."""
        trainer, state = self.trainer, self.state
        steps = trainer.state.global_step
        # all the stage's steps: the Trainer's own training_loss covers only those after a resume
        train_loss = callback.loss_sum() / steps if steps else result.training_loss
        state.finished.append({"stage": index, "num_segments": self.recipe.curriculum.stages[index].num_segments,
                               "steps": steps, "epochs": finite(trainer.state.epoch), "train_loss": finite(train_loss),
                               "reason": state.stop_reason or f"step budget ({budget})"})
        state.stage, state.steps_before = index + 1, state.steps_before + steps
        state.best, state.bad_evals, state.stop_reason, state.loss_sum = None, 0, None, 0.0
        end = runs.end_dir(self.out, index)
        trainer.save_model(end)
        if trainer.args.should_save:
            state.save(end)

    def keep_best_callback(self, index: int) -> KeepBest | None:
        """curriculum.keep_best_segments' scorer for stage ``index``, or None when the stage keeps none."""
        recipe, cur = self.recipe, self.recipe.curriculum
        first = cur.levers_from_stage if cur.keep_best_from_stage is None else cur.keep_best_from_stage
        if cur.keep_best_segments is None or index < first:
            return None
        # held-out samples: the seed differs from training's (+0), evaluation's (+1) and the final one's (+2)
        data = build_dataset(recipe, self.tokenizer, [cur.keep_best_segments], cur.keep_best_samples,
                             recipe.data.seed + 3)
        return KeepBest(self.out, data, cur.keep_best_segments, index, self.state.steps_before, self.kept)

    def evaluate(self) -> dict:
        """The final evaluation per number of segments (trl's held-out split for sft), reported once."""
        recipe, trainer, evaluation = self.recipe, self.trainer, {}
        with final_evaluation(trainer):  # reported once below, not as a scalar per length and metric
            if recipe.trainer == "sft":  # trl prepared (and truncated) the eval split with the last stage
                metrics = trainer.evaluate(metric_key_prefix="final")
                evaluation["all"] = eval_entry(metrics["final_accuracy"], metrics["final_loss"])
            for n in final_segments(recipe) if recipe.trainer == "rmt" else []:
                ds = build_dataset(recipe, self.tokenizer, [n], recipe.eval.num_samples or recipe.data.num_eval_samples,
                                   recipe.data.seed + 2)
                metrics = trainer.evaluate(eval_dataset=ds, metric_key_prefix=f"final_{n}")
                evaluation[str(n)] = eval_entry(metrics[f"final_{n}_accuracy"], metrics[f"final_{n}_loss"])
        if trainer.args.should_save:
            log_final_evaluation(trainer.args.report_to, self.out, evaluation,
                                 format_table({"eval": evaluation, "num_memory_tokens": recipe.memory.num_memory_tokens}))
        return evaluation

    def record_divergence(self, event: dict, first_bad_step: int) -> None:
        """summary.json of a run the guard stopped: what broke, where, and the last good save."""
        good = runs.latest_checkpoint(runs.stage_dir(self.out, event["stage"]), lambda *_: None, first_bad_step,
                                      CurriculumState)
        summary = {"status": "diverged", **event, "last_good_checkpoint": good, "stages": self.state.finished,
                   "rollbacks": self.state.rollbacks,
                   "hint": "resume with training.resume_from_checkpoint=true and a lower training.learning_rate "
                           "(or guard.on_divergence=rollback)"}
        if is_main_process():  # summary.json has one writer, the same process that writes the final one
            runs.write_summary(self.out, summary)


def train_recipe(recipe: Recipe, log=print) -> dict:
    """Run the recipe's curriculum (``CurriculumRun``), save ``final/``, evaluate, write
    ``summary.json``; the output folder is locked for the run (lock.py). Raises TrainingDiverged
    when the guard stops the run."""
    recipe = with_local_paths_resolved(recipe)
    lock = RunLock(recipe.output_dir) if is_main_process() else None
    try:
        if lock is not None:
            lock.acquire()
        return CurriculumRun(recipe, log).train()
    except (OSError, SafetensorError) as err:  # a full disk or a folder that became read-only while training
        raise disk_error(err, getattr(err, "filename", None) or recipe.output_dir) from err
    except RuntimeError as err:
        if not any(sign in str(err) for sign in TORCH_SAVE_FAILURES):
            raise
        # torch.save (optimizer.pt, ...) reports a full disk as a RuntimeError of its zip writer; the
        # unfinished checkpoint has no saved progress, so a resume skips it
        raise UserError(f"writing a checkpoint in {recipe.output_dir} failed ({str(err).splitlines()[0][:120]}); "
                        f"is the disk full? Free some space and resume with "
                        f"training.resume_from_checkpoint=true") from err
    finally:
        if lock is not None:
            lock.release()


def run(recipe: Recipe, log=print) -> dict:
    """``train_recipe``, plus the 0-memory baseline when ``eval.baseline`` asks; the combined
    accuracy table is printed (stdout) and written to summary.json."""
    summary = train_recipe(recipe, log)
    if recipe.eval.baseline:
        end_run()  # the baseline reports as a run of its own
        lock = RunLock(recipe.output_dir) if is_main_process() else None  # the baseline lives inside the run
        if lock is not None:
            lock.acquire()
        try:
            log(f"the 0-memory baseline (eval.baseline): the same curriculum in "
                f"{runs.baseline_dir(recipe.output_dir)}")
            base = train_recipe(baseline_recipe(recipe), log)
        except TrainingDiverged as err:
            summary["status"] = "baseline diverged"
            summary["baseline"] = {"status": "diverged", "reason": str(err)}
            raise
        else:
            summary["baseline"] = base
            summary["accuracy"] = {"memory": {n: m["accuracy"] for n, m in summary["eval"].items()},
                                   "baseline": {n: m["accuracy"] for n, m in base["eval"].items()}}
        finally:
            if is_main_process():
                runs.write_summary(recipe.output_dir, summary)
            if lock is not None:
                lock.release()
    if is_main_process():
        write_model_card(runs.final_dir(recipe.output_dir), run_dir=recipe.output_dir)  # with the results
        print(format_table(summary), flush=True)  # the result: stdout, whatever the verbosity
    return summary


def baseline_recipe(recipe: Recipe) -> Recipe:
    """The same run with 0 memory tokens (segments processed independently), in OUTPUT_DIR/baseline.
    A resume resumes the baseline too when it had started, and starts it otherwise."""
    training = {**recipe.training, "output_dir": runs.baseline_dir(recipe.output_dir)}
    if training.get("resume_from_checkpoint"):
        training["resume_from_checkpoint"] = runs.has_started(training["output_dir"])
    return dataclasses.replace(recipe, memory=dataclasses.replace(recipe.memory, num_memory_tokens=0),
                               training=training, eval=dataclasses.replace(recipe.eval, baseline=False))


def with_local_paths_resolved(recipe: Recipe) -> Recipe:
    """``model.name_or_path`` and ``model.tokenizer`` that name local folders, made absolute: the
    run's recipe.yaml and its adapter's recorded base then load from any folder (eval, ask, export)."""
    model = recipe.model
    changes = {key: os.path.abspath(value) for key in ("name_or_path", "tokenizer")
               if (value := getattr(model, key)) and os.path.exists(value) and not os.path.isabs(value)}
    return dataclasses.replace(recipe, model=dataclasses.replace(model, **changes)) if changes else recipe


def provenance(started: float) -> dict:
    """When the run (this process's part of it) started and ended, its wall time, and the software
    and devices it ran on: what a result needs to be traced or compared."""
    now = time.time()
    return {"started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
            "finished": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": round(now - started, 1), "versions": versions(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "world_size": int(os.environ.get("WORLD_SIZE", "1"))}


def finite(value: float | None) -> float | None:
    """``value``, or None when it is NaN or infinite (JSON has no such numbers)."""
    return value if value is not None and math.isfinite(value) else None


def eval_entry(accuracy: float, loss: float) -> dict:
    return {"accuracy": finite(accuracy), "loss": finite(loss),
            "perplexity": math.exp(loss) if math.isfinite(loss) and loss < 50 else None}


def number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_table(summary: dict) -> str:
    rows = sorted(summary["eval"], key=lambda n: int(n) if n.isdigit() else 1 << 30)  # "all": trl's eval split
    base = summary.get("baseline", {}).get("eval", {})
    m = summary["num_memory_tokens"]
    header = f"{'segments':>8} | {f'accuracy ({m} memory)':>22}" + (f" | {'accuracy (0 memory)':>20}" if base else "")
    lines = [header, "-" * len(header)]
    for n in rows:
        line = f"{n:>8} | {number(summary['eval'][n]['accuracy']):>22}"
        if base:
            line += f" | {number(base[n]['accuracy']):>20}"
        lines.append(line)
    return "\n".join(lines)
