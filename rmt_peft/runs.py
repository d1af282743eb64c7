"""The run folder: every name in it, what each part holds, how a run resumes from it, and where
commands may write. Training, eval, export, ask and the model card ask this module; no other module
spells these names.

    OUTPUT_DIR/
      recipe.yaml        the resolved recipe                         recipe_path
      summary.json       status, stages, final evaluation            summary_path, write_summary
      final/             the adapter a user loads (saving.py's format) final_dir
      baseline/          eval.baseline's 0-memory run, itself a run  baseline_dir
      eval/, eval-<n>/   rmt-peft eval's output                      free_eval_dir
      stage-<k>/         curriculum stage k:                         stage_dir
        checkpoint-<N>/    the Trainer's checkpoints (+ the resume state, RESUME_FILES)
        end/               the weights when stage k ended (+ the resume state)  end_dir
        suspect-checkpoint-<N>/  saved after a divergence began: never resumed from
      best/              curriculum.keep_best_segments' best weights + kept.json  save_best, read_kept
      logs/              TensorBoard's curve of the whole curriculum  log_dir
      .rmt-peft.lock     while a run owns the folder (train/lock.py)  lock_path

A checkpoint or end/ is finished when its ``curriculum.json`` (the curriculum's progress, written
last and atomically) is there, and usable when its files read back (``damage``); a resume takes
the newest usable one (``find_resume_point``). A run may start in a folder that holds nothing, or
only what a start killed before its first save leaves (``check_start``); no command writes into
what a run owns (``check_output``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from typing import Callable, TypeVar

import yaml

from .errors import RecipeError, UserError
from .fileio import TEMP_MARK, check_writable, safetensors_problem, write_json, write_text

T = TypeVar("T")

RUN_RECIPE_FILE = "recipe.yaml"
RUN_SUMMARY_FILE = "summary.json"
FINAL_DIR = "final"
BASELINE_DIR = "baseline"
EVAL_DIR = "eval"
EVAL_DIRS = rf"{EVAL_DIR}(-\d+)?"  # eval's folders at the top of a run: RUN/eval, RUN/eval-2, ...
BEST_DIR = "best"
KEPT_FILE = "kept.json"
LOG_DIR = "logs"
LOCK_FILE = ".rmt-peft.lock"
STAGE_DIR = re.compile(r"stage-(\d+)")
END_DIR = "end"
CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")  # the Trainer's names (transformers' PREFIX_CHECKPOINT_DIR)
SUSPECT_PREFIX = "suspect-"
# what train writes at the top of a run folder: no other command writes there, even with --overwrite
RUN_OWNED = {RUN_RECIPE_FILE, RUN_SUMMARY_FILE, FINAL_DIR, BASELINE_DIR, BEST_DIR, LOG_DIR, LOCK_FILE}
# beside the adapter in a checkpoint or a stage's end/: resume state, never exported
STATE_FILE = "curriculum.json"            # the curriculum's progress; written last, so it marks a finished save
TRAINABLE_FILE = "trainable.safetensors"  # every trainable tensor by name (train/engine.save_adapter)
TRAINER_STATE_FILE = "trainer_state.json"
DEFAULT_SEED = 42  # transformers.TrainingArguments' seed: a run's when its recipe sets none
RESUME_FILES = {TRAINABLE_FILE, STATE_FILE, TRAINER_STATE_FILE, "training_args.bin", "optimizer.pt",
                "scheduler.pt", "scaler.pt"}  # + the Trainer's rng_state*.pth


# -- paths ----------------------------------------------------------------------------------
def recipe_path(run: str) -> str:
    return os.path.join(run, RUN_RECIPE_FILE)


def summary_path(run: str) -> str:
    return os.path.join(run, RUN_SUMMARY_FILE)


def final_dir(run: str) -> str:
    return os.path.join(run, FINAL_DIR)


def baseline_dir(run: str) -> str:
    return os.path.join(run, BASELINE_DIR)


def best_dir(run: str) -> str:
    return os.path.join(run, BEST_DIR)


def log_dir(run: str) -> str:
    return os.path.join(run, LOG_DIR)


def lock_path(run: str) -> str:
    return os.path.join(run, LOCK_FILE)


def stage_dir(run: str, index: int) -> str:
    return os.path.join(run, f"stage-{index}")


def end_dir(run: str, index: int) -> str:
    """The weights (and resume state) of stage ``index`` when it ended."""
    return os.path.join(stage_dir(run, index), END_DIR)


def checkpoint_dir(stage_folder: str, step: int) -> str:
    return os.path.join(stage_folder, f"checkpoint-{step}")


def is_stage_end(folder: str) -> bool:
    """A stage's end/ (its run goes on with the next stage), not a checkpoint inside a stage."""
    return os.path.basename(os.path.normpath(folder)) == END_DIR


def is_resume_file(name: str) -> bool:
    """A file of a checkpoint that only a resume reads (an export leaves it out)."""
    return name in RESUME_FILES or (name.startswith("rng_state") and name.endswith(".pth"))


# -- what a folder is -----------------------------------------------------------------------
def is_run(path: str) -> bool:
    """A training run: its recipe.yaml and its final/ adapter."""
    return os.path.isfile(recipe_path(path)) and os.path.isdir(final_dir(path))


def run_folder(adapter: str) -> str | None:
    """The training run an adapter folder belongs to (its parent holds the run's recipe.yaml), or None."""
    parent = os.path.dirname(os.path.abspath(adapter))
    return parent if os.path.isfile(recipe_path(parent)) else None


def run_recipe(adapter: str) -> str | None:
    """The recipe.yaml of the run an adapter folder belongs to, or None."""
    run = run_folder(adapter)
    return recipe_path(run) if run is not None else None


def is_run_final(adapter: str) -> bool:
    """``adapter`` is a run's final/ folder (named after its run)."""
    return os.path.basename(os.path.normpath(adapter)) == FINAL_DIR and run_folder(adapter) is not None


def model_name(path: str, taken: list[str]) -> str:
    """A legend name: the run's folder name (a run's ``final`` folder is named after the run)."""
    norm = os.path.normpath(path)
    name = os.path.basename(norm)
    if name == FINAL_DIR:
        name = os.path.basename(os.path.dirname(norm)) or name
    while name in taken:
        name += " (baseline)"
    return name


def read_run(run_dir: str | None) -> tuple[dict, dict]:
    """(recipe, summary) of a training run folder as plain data; empty dicts for what it does not hold."""
    recipe, summary = {}, {}
    if run_dir and os.path.isfile(recipe_path(run_dir)):
        with open(recipe_path(run_dir)) as f:
            recipe = yaml.safe_load(f) or {}
    if run_dir and os.path.isfile(summary_path(run_dir)):
        with open(summary_path(run_dir)) as f:
            summary = json.load(f)
    return recipe, summary


def seed_of(training: dict) -> int:
    """The seed a run trains with (and builds a tiny backbone from): its recipe's ``training.seed``,
    else ``DEFAULT_SEED``."""
    return int(training.get("seed", DEFAULT_SEED))


def write_summary(run: str, summary: dict) -> None:
    write_json(summary_path(run), summary)


def write_recipe(run: str, text: str) -> None:
    write_text(recipe_path(run), text)


# -- where a command may write ---------------------------------------------------------------
def _is_run_folder(path: str) -> bool:
    """A folder train writes (or wrote) into: the lock of a run there, or its recipe.yaml with what
    training writes beside it (a recipe.yaml alone may be the user's own recipe file)."""
    if os.path.exists(lock_path(path)):
        return True
    if not os.path.isfile(recipe_path(path)):
        return False
    return any(name in (FINAL_DIR, RUN_SUMMARY_FILE) or STAGE_DIR.fullmatch(name) for name in os.listdir(path))


def enclosing_run(path: str) -> str | None:
    """The nearest training run folder that is ``path`` or holds it (symbolic links resolved), or None."""
    probe = os.path.realpath(path)
    while True:
        if _is_run_folder(probe):
            return probe
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _holds_run(folder: str) -> str | None:
    """A training run inside ``folder`` (itself excluded), or None."""
    for root, dirs, _ in os.walk(folder):
        for name in dirs:
            if _is_run_folder(os.path.join(root, name)):
                return os.path.join(root, name)
    return None


def check_output(path: str, flag: str, overwrite: bool = False, *, folder: bool, own: str | None = None) -> None:
    """The rule of every command that writes (export --to, eval --out, ask --save-memory; train's
    output_dir: ``check_train_output``): no command writes into, or deletes, what it does not own.

    Refused always (a UserError naming ``flag``): an empty path; the current folder or one that holds
    it; a training run itself, what train writes in it (``RUN_OWNED``, ``stage-<k>/``) or, for a folder
    that would be replaced, one that holds a run; a folder where a file is expected (``folder`` False)
    or the reverse. Refused unless ``overwrite``: an existing file, a folder that is not empty, a path
    inside a run folder. ``own``: a name pattern the command owns at the top of a run (eval's
    ``EVAL_DIRS``), checked there like a path outside a run."""
    what = "folder" if folder else "file"
    if not path or not path.strip():
        raise UserError(f"{flag} is empty; give the {what} to write")
    real = os.path.realpath(path)
    if folder:
        check_not_current_folder(path, flag)
    if os.path.isdir(real) and not folder:
        raise UserError(f"{flag} {path} is a folder; expected a file")
    if os.path.exists(real) and not os.path.isdir(real) and folder:
        raise UserError(f"{flag} {path} is a file; expected a folder")
    _check_not_a_runs_own(path, real, flag, what)
    run = enclosing_run(real)
    if run is not None:
        top = os.path.relpath(real, run).split(os.sep)[0]
        owned = own is not None and re.fullmatch(own, top) and real == os.path.join(run, top)
        if not overwrite and not owned:
            raise UserError(f"{flag} {path} lies inside the training run {run}; choose a path outside it, or give "
                            f"--overwrite to write there (a run's own files stay protected)")
    if folder and os.path.isdir(real):
        holds = _holds_run(real)
        if holds is not None:
            raise UserError(f"{flag} {path} holds the training run {holds}: replacing it would delete the run "
                            f"(--overwrite does not change this); choose a new folder")
        if os.listdir(real) and not overwrite:
            raise UserError(f"{flag} {path} already holds files; nothing is overwritten: choose a new folder, or "
                            f"give --overwrite to replace its content")
    if not folder and os.path.exists(real) and not overwrite:
        raise UserError(f"{flag} {path} already exists; nothing is overwritten: choose a new file, or give "
                        f"--overwrite to replace it")
    check_writable(os.path.dirname(real) if not folder else real, flag, given=path)


def check_not_current_folder(path: str, flag: str) -> None:
    """Refuse a folder to be replaced that is the current folder or holds it: checked before any
    other reason, so the answer does not depend on where the command runs."""
    if _inside(os.path.realpath(os.getcwd()), os.path.realpath(path)):
        raise UserError(f"{flag} {path} is the current folder or holds it: writing there would replace what you "
                        f"work in; choose a new folder (--overwrite does not change this)")


def _check_not_a_runs_own(path: str, real: str, flag: str, what: str) -> None:
    """Refuse a training run itself, and what train writes in any run that holds ``real``."""
    run = outer = enclosing_run(real)
    if run is not None and real == run:
        raise UserError(f"{flag} {path} is a training run: its files are never overwritten (--overwrite does not "
                        f"change this); choose a new {what}")
    while outer is not None:  # every run that holds the path (a run's baseline/ is a run of its own)
        top = os.path.relpath(real, outer).split(os.sep)[0]
        if top in RUN_OWNED or STAGE_DIR.fullmatch(top):
            raise UserError(f"{flag} {path} is part of the training run {outer} (its {top}): a run's stages, "
                            f"checkpoints, logs and final weights are never overwritten (--overwrite does not "
                            f"change this); choose a path outside them")
        outer = enclosing_run(os.path.dirname(outer))


def check_train_output(out: str) -> None:
    """check_output for training.output_dir, which train owns once it starts there: the current
    folder, and a folder inside another run (or a run's own files), are refused; whether an
    existing folder may be started or resumed in is ``check_start``'s answer."""
    key = "training.output_dir"
    real = os.path.realpath(out)
    if _inside(os.path.realpath(os.getcwd()), real):
        raise UserError(f"{key}={out!r} is the current folder or holds it; a run needs a folder of its own "
                        f"(e.g. runs/NAME)")
    run = enclosing_run(os.path.dirname(real))
    if run is not None:
        raise UserError(f"{key}={out!r} lies inside the training run {run}; choose a folder outside it")


def free_eval_dir(folder: str) -> str:
    """``folder/eval``, or beside it ``eval-2``, ``eval-3``, ... when it holds an earlier evaluation."""
    path, n = os.path.join(folder, EVAL_DIR), 1
    while os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        n += 1
        path = os.path.join(folder, f"{EVAL_DIR}-{n}")
    return path


# -- starting and resuming ------------------------------------------------------------------
def saved_progress(folder: str) -> bool:
    """True when a run in ``folder`` saved anything worth keeping (a finished checkpoint or stage
    end, final/, summary.json); a start that failed before that leaves recipe.yaml, logs and
    unfinished saves only."""
    if not os.path.isdir(folder):
        return False
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name in (FINAL_DIR, RUN_SUMMARY_FILE):
            return True
        if STAGE_DIR.fullmatch(name) and os.path.isdir(path):
            if any((n == END_DIR or CHECKPOINT_DIR.fullmatch(n)) and os.path.exists(os.path.join(path, n, STATE_FILE))
                   for n in os.listdir(path)):
                return True
        if name == BASELINE_DIR and saved_progress(path):
            return True
    return False


def check_start(out: str, resume: bool) -> bool:
    """Whether a run may start (or resume) in ``out``; returns the resume flag to use (a RecipeError
    naming training.output_dir otherwise). What a start killed before its first save leaves
    (recipe.yaml, stage folders with logs, TensorBoard logs, a stale lock, the temporary files of an
    interrupted write) never blocks a fresh start, and a resume of such a folder starts afresh."""
    if not os.path.isdir(out):
        if resume:
            raise RecipeError(f"training.resume_from_checkpoint is set but {out!r} holds no run to resume")
        return resume
    names = {n for n in os.listdir(out) if n != LOCK_FILE and not (n.startswith(".") and TEMP_MARK in n)}
    left_by_failed_start = all(n in (RUN_RECIPE_FILE, BASELINE_DIR, LOG_DIR) or STAGE_DIR.fullmatch(n)
                               for n in names) and not saved_progress(out)
    if resume:
        if RUN_RECIPE_FILE in names:
            return resume
        if left_by_failed_start:  # nothing (but temporary files and a lock), or no recipe.yaml yet
            return False
        raise RecipeError(f"training.resume_from_checkpoint is set but {out!r} holds no run to resume (no "
                          f"{RUN_RECIPE_FILE})")
    if names and not left_by_failed_start:
        raise RecipeError(f"training.output_dir={out!r} already holds files (another run?); nothing is "
                          f"overwritten: choose a new output_dir, resume with training.resume_from_checkpoint=true, "
                          f"or delete the folder")
    return resume


def has_started(run: str) -> bool:
    """A run was started in ``run`` (its recipe.yaml is there): a resume resumes it."""
    return os.path.exists(recipe_path(run))


def remove_failed_start(out: str) -> None:
    """Remove ``out`` (created by this run) when the run failed before writing anything but its
    recipe.yaml: a failed start. Anything else (logs, checkpoints, a record of a divergence) stays."""
    if not os.path.isdir(out):
        return
    written = [os.path.relpath(os.path.join(root, f), out) for root, _, files in os.walk(out) for f in files]
    if set(written) <= {RUN_RECIPE_FILE}:
        shutil.rmtree(out, ignore_errors=True)


def write_state(folder: str, state: dict) -> None:
    """The curriculum's progress in a checkpoint or end/ (atomic: a kill leaves the old one or none)."""
    write_json(os.path.join(folder, STATE_FILE), state)


def read_state(folder: str, build: Callable[..., T] = dict) -> T:
    """The curriculum's progress saved in ``folder``, as ``build(**fields)``; a UserError naming the
    file when it is damaged (or holds fields ``build`` does not take)."""
    path = os.path.join(folder, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return build(**json.load(f))
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{path} is damaged ({type(err).__name__}: {err}); resume from an earlier checkpoint "
                        f"with training.resume_from_checkpoint=<folder>, or delete {folder}") from err


def damage(folder: str, build: Callable = dict) -> str | None:
    """Why a checkpoint or ``end/`` folder cannot be resumed from (a missing or unreadable file), or
    None when it can. ``curriculum.json`` is written last and atomically, so its presence marks a
    finished save; ``build`` reads it as the curriculum does (``read_state``). Cheap structural
    reads catch files cut short (a full disk, a copy that broke off): the headers of the safetensors
    files, the zip directory at the end of the Trainer's torch.save files (optimizer, scheduler, RNG
    states), the Trainer's JSON state."""
    try:
        read_state(folder, build)
    except UserError as err:
        return str(err)
    path = os.path.join(folder, TRAINABLE_FILE)
    problem = safetensors_problem(path)
    if problem is not None:
        return f"{path} is missing or damaged ({problem})"
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        try:
            if name.endswith((".pt", ".pth")):
                zipfile.ZipFile(path).close()
            elif name == TRAINER_STATE_FILE:
                with open(path, encoding="utf-8") as f:
                    json.load(f)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            return f"{path} is damaged ({err})"
    return None


def checkpoints(folder: str) -> list[tuple[int, str]]:
    """(step, path) of the Trainer checkpoints in a stage folder, newest first."""
    if not os.path.isdir(folder):
        return []
    return sorted(((int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
                   if (m := CHECKPOINT_DIR.fullmatch(name))), reverse=True)


def latest_checkpoint(folder: str, log=print, before: int | None = None,
                      build: Callable = dict) -> str | None:
    """The newest undamaged checkpoint in a stage folder (of a step < ``before`` when given);
    damaged newer ones are named in the log."""
    for step, path in checkpoints(folder):
        if before is not None and step >= before:
            continue
        if not os.path.exists(os.path.join(path, STATE_FILE)):
            continue  # a save that was cut off before it finished
        problem = damage(path, build)
        if problem is None:
            return path
        log(f"warning: skipping checkpoint {path}: {problem}")
    return None


def find_resume_point(run: str, num_stages: int, log=print, build: Callable = dict) -> str | None:
    """The furthest point a previous run reached: the latest checkpoint of the latest stage it
    entered, or the end/ of the last stage it finished (``is_stage_end``); None: the start.
    Damaged saves are skipped (and named in the log) in favour of the previous good one."""
    for index in reversed(range(num_stages)):
        end = end_dir(run, index)
        if os.path.exists(os.path.join(end, STATE_FILE)):
            problem = damage(end, build)
            if problem is None:
                return end
            log(f"warning: skipping {end}: {problem}")
        checkpoint = latest_checkpoint(stage_dir(run, index), log, build=build)
        if checkpoint is not None:
            return checkpoint
    return None


def set_aside_suspect_checkpoints(stage_folder: str, first_bad_step: int, log) -> None:
    """Rename the checkpoints saved while the gradients were already exploding (step >=
    ``first_bad_step``) to ``suspect-checkpoint-<step>``: a resume never picks them, nothing is deleted."""
    for step, path in checkpoints(stage_folder):
        if step >= first_bad_step:
            target = os.path.join(stage_folder, f"{SUSPECT_PREFIX}{os.path.basename(path)}")
            shutil.rmtree(target, ignore_errors=True)  # from an earlier rollback over the same steps
            os.rename(path, target)
            log(f"warning: {path} was saved after the divergence began; renamed to {target}")


# -- the best weights (curriculum.keep_best_segments) ---------------------------------------
def read_kept(run: str) -> dict | None:
    """The record of the weights in ``RUN/best/``, or None when there are none yet."""
    path = os.path.join(best_dir(run), KEPT_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is damaged ({type(err).__name__}: {err}); delete {best_dir(run)} "
                        f"(its weights are scored again at the next evaluation)") from err


def save_best(run: str, save_weights: Callable[[str], None], record: dict, should_save: bool) -> None:
    """``save_weights(folder)`` and kept.json (``record``) into a temporary folder, then swapped in
    for best/: a kill leaves the old best/ or the new one (or, between the two renames, none: the
    next start removes the temporary folders and scoring begins again). ``save_weights`` runs on
    every rank (under ZeRO-3 it gathers the weights); the rest only where ``should_save``."""
    final = best_dir(run)
    partial = os.path.join(run, f".{BEST_DIR}{TEMP_MARK}new")
    save_weights(partial)
    if not should_save:
        return
    write_json(os.path.join(partial, KEPT_FILE), record)
    old = os.path.join(run, f".{BEST_DIR}{TEMP_MARK}old")
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)
