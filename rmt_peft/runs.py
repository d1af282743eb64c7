"""The run folder: what ``rmt-peft train`` writes, and how eval, export and ask open what it wrote.

    OUTPUT_DIR/
      recipe.yaml        the resolved recipe                       RUN_RECIPE_FILE
      summary.json       status, stages, final evaluation          RUN_SUMMARY_FILE
      final/             the adapter a user loads (hub.py's format) FINAL_DIR
      baseline/          eval.baseline's 0-memory run, itself a run BASELINE_DIR
      eval/              rmt-peft eval's output                    EVAL_DIR
      stage-<k>/         curriculum stage k's checkpoints and end/ (train/curriculum.py),
                         each an adapter + the resume state (RESUME_FILES)
      best/              curriculum.keep_best_segments' best-scoring weights (train/keep_best.py)
      logs/              TensorBoard's curve of the whole curriculum (train/tracking.py)
      .rmt-peft.lock     while a run owns the folder               (train/lock.py)

The names the model card reads (recipe.yaml, summary.json, final/) are defined in hub.py, below
this module; everything that decides something about a run folder is here: what a path given to a
command is (``locate`` for eval and ask, ``adapter_folder`` for export), which tokenizer goes with
a run (``tokenizer_name``, the same precedence for training and loading) and how a run's model is
loaded with the recipe's settings (``load_model``; its flags are in ``options.py``), and where a
command may write (``check_output``: the one rule of every command that writes, below).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from .backbones import DTYPES, check_position_limit
from .data.tokenizer import offline_tokenizer
from .errors import UserError
from .fileio import check_writable
from .hub import (ADAPTER_CONFIG_FILE, MEMORY_CONFIG_FILE, MODEL_CONFIG_FILE, RUN_FINAL_DIR, RUN_RECIPE_FILE,
                  RUN_SUMMARY_FILE, read_run)
from .recipe import Recipe, load_recipe
from .recurrent import RMTModel

FINAL_DIR = RUN_FINAL_DIR
BASELINE_DIR = "baseline"
EVAL_DIR = "eval"
BEST_DIR = "best"
LOG_DIR = "logs"
LOCK_FILE = ".rmt-peft.lock"
# what train writes at the top of a run folder: no other command writes there, even with --overwrite
RUN_OWNED = {RUN_RECIPE_FILE, RUN_SUMMARY_FILE, FINAL_DIR, BASELINE_DIR, BEST_DIR, LOG_DIR, LOCK_FILE}
STAGE_DIR = re.compile(r"stage-\d+")
# beside the adapter in a checkpoint or a stage's end/ (train/curriculum.py): resume state, never exported
STATE_FILE = "curriculum.json"            # the curriculum's progress; written last, so it marks a finished save
TRAINABLE_FILE = "trainable.safetensors"  # every trainable tensor by name (trainer.save_adapter)
RESUME_FILES = {TRAINABLE_FILE, STATE_FILE, "trainer_state.json", "training_args.bin", "optimizer.pt",
                "scheduler.pt", "scaler.pt"}  # + the Trainer's rng_state*.pth
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # transformers': a folder that holds its own tokenizer
OFFLINE_TOKENIZER = "offline"                     # model.tokenizer / --tokenizer: the data package's

# RUN_SUMMARY_FILE and read_run are hub.py's, re-exported: the run folder's vocabulary in one place
__all__ = ["RUN_RECIPE_FILE", "RUN_SUMMARY_FILE", "FINAL_DIR", "BASELINE_DIR", "EVAL_DIR", "STATE_FILE", "TRAINABLE_FILE",
           "RESUME_FILES", "BEST_DIR", "LOG_DIR", "LOCK_FILE", "RUN_OWNED", "read_run", "is_run",
           "run_folder", "enclosing_run", "check_output", "check_train_output", "free_eval_dir", "locate",
           "model_name", "adapter_folder", "remove_failed_start", "read_recipe",
           "tokenizer_name", "load_tokenizer", "command_tokenizer", "base_model", "check_weight_files", "model_device",
           "load_model"]


# -- what a path is -------------------------------------------------------------------------
def is_run(path: str) -> bool:
    """A training run: its recipe.yaml and its final/ adapter."""
    return os.path.isfile(os.path.join(path, RUN_RECIPE_FILE)) and os.path.isdir(os.path.join(path, FINAL_DIR))


def run_folder(adapter: str) -> str | None:
    """The training run an adapter folder belongs to (its parent holds the run's recipe.yaml), or None."""
    parent = os.path.dirname(os.path.abspath(adapter))
    return parent if os.path.isfile(os.path.join(parent, RUN_RECIPE_FILE)) else None


def locate(path: str) -> tuple[str, str | None]:
    """(adapter folder or Hub id, recipe.yaml path or None) of a run, an adapter folder or a Hub id
    (eval, ask: a UserError names what ``path`` is not)."""
    if is_run(path):
        return os.path.join(path, FINAL_DIR), os.path.join(path, RUN_RECIPE_FILE)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, MEMORY_CONFIG_FILE)):
            raise UserError(f"{path} is neither a training run (recipe.yaml + final/) nor an adapter folder "
                            f"({MEMORY_CONFIG_FILE})")
        parent = os.path.join(os.path.dirname(os.path.normpath(path)), RUN_RECIPE_FILE)
        return path, parent if os.path.isfile(parent) else None
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise UserError(f"{path} is not a folder (expected a training run, an adapter folder or a Hub id "
                        f"like user/model)")
    return path, None  # a Hub id


def model_name(path: str, taken: list[str]) -> str:
    """A legend name: the run's folder name (a run's ``final`` folder is named after the run)."""
    norm = os.path.normpath(path)
    name = os.path.basename(norm)
    if name == FINAL_DIR:
        name = os.path.basename(os.path.dirname(norm)) or name
    while name in taken:
        name += " (baseline)"
    return name


def adapter_folder(source: str) -> str:
    """``source`` itself when it holds a saved model, else its ``final/`` (a training run); export
    reads local folders only (FileNotFoundError names what ``source`` is not)."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source} is not a folder (expected a run's OUTPUT_DIR or an adapter folder)")
    markers = (ADAPTER_CONFIG_FILE, MODEL_CONFIG_FILE, MEMORY_CONFIG_FILE)
    if any(os.path.isfile(os.path.join(source, m)) for m in markers):
        return source
    final = os.path.join(source, FINAL_DIR)
    if os.path.isdir(final):
        return final
    raise FileNotFoundError(f"{source} is neither an adapter folder (no {ADAPTER_CONFIG_FILE} / "
                            f"{MEMORY_CONFIG_FILE}) nor a training run (no {FINAL_DIR}/ folder)")


# -- where a command may write ---------------------------------------------------------------
def _is_run_folder(path: str) -> bool:
    """A folder train writes (or wrote) into: the lock of a run there, or its recipe.yaml with what
    training writes beside it (a recipe.yaml alone may be the user's own recipe file)."""
    if os.path.exists(os.path.join(path, LOCK_FILE)):
        return True
    if not os.path.isfile(os.path.join(path, RUN_RECIPE_FILE)):
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
    ``eval``, ``eval-<n>``), checked there like a path outside a run."""
    what = "folder" if folder else "file"
    if not path or not path.strip():
        raise UserError(f"{flag} is empty; give the {what} to write")
    real = os.path.realpath(path)
    if folder and _inside(os.path.realpath(os.getcwd()), real):
        raise UserError(f"{flag} {path} is the current folder or holds it: writing there would replace what you "
                        f"work in; choose a new folder (--overwrite does not change this)")
    if os.path.isdir(real) and not folder:
        raise UserError(f"{flag} {path} is a folder; expected a file")
    if os.path.exists(real) and not os.path.isdir(real) and folder:
        raise UserError(f"{flag} {path} is a file; expected a folder")
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


def check_train_output(out: str) -> None:
    """check_output for training.output_dir, which train owns once it starts there: the current
    folder, and a folder inside another run (or a run's own files), are refused; whether an
    existing folder may be started or resumed in is the trainer's check (``check_output_dir``)."""
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


def remove_failed_start(out: str) -> None:
    """Remove ``out`` (created by this run) when the run failed before writing anything but its
    recipe.yaml: a failed start. Anything else (logs, checkpoints, a record of a divergence) stays."""
    if not os.path.isdir(out):
        return
    written = [os.path.relpath(os.path.join(root, f), out) for root, _, files in os.walk(out) for f in files]
    if set(written) <= {RUN_RECIPE_FILE}:
        shutil.rmtree(out, ignore_errors=True)


def read_recipe(path: str | None, overrides: list[str] = ()) -> Recipe | None:
    """The recipe at ``path`` (a run's recipe.yaml, from ``locate``) with ``overrides``, or None."""
    return None if path is None else load_recipe(path, list(overrides))


# -- which tokenizer ------------------------------------------------------------------------
def tokenizer_name(recipe: Recipe | None, adapter: str | None = None, override: str | None = None) -> str:
    """The first of: ``override`` (--tokenizer), the recipe's model.tokenizer, the adapter folder's
    own tokenizer files, the offline tokenizer for tiny models, the recipe's model, the base model
    the adapter records. ``"offline"`` names the data package's offline tokenizer."""
    name = override or (recipe.model.tokenizer if recipe is not None else None)
    if name is None and adapter is not None and os.path.isfile(os.path.join(adapter, TOKENIZER_CONFIG_FILE)):
        name = adapter
    if name is None and recipe is not None and recipe.model.is_tiny:
        name = OFFLINE_TOKENIZER
    if name is None:
        name = recipe.model.name_or_path if recipe is not None else base_model(adapter)
    return name


def load_tokenizer(name: str):
    """``tokenizer_name``'s choice, loaded (OSError when it cannot be found)."""
    if name == OFFLINE_TOKENIZER:
        return offline_tokenizer()
    return AutoTokenizer.from_pretrained(name)


def base_model(adapter: str) -> str:
    """The base model a LoRA adapter folder records, else the folder itself (full weights, or a Hub
    id: it holds its own tokenizer)."""
    config = os.path.join(adapter, ADAPTER_CONFIG_FILE)
    if os.path.isfile(config):
        with open(config) as f:
            base = json.load(f).get("base_model_name_or_path")
        if base:
            return base
    return adapter


# -- loading a run's model ------------------------------------------------------------------
def check_weight_files(folder: str) -> None:
    """A UserError naming the first .safetensors file of ``folder`` whose header cannot be read, or
    .json file that does not parse (a truncated or hand-edited memory_config.json, ...)."""
    if not os.path.isdir(folder):
        return  # a Hub id
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt") as f:
                    f.keys()
            except Exception as err:  # safetensors' own error types, one per kind of damage
                raise UserError(f"{path} is damaged or not a safetensors file ({err}); export or train it "
                                f"again") from None
        elif name.endswith(".json") and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            except (ValueError, UnicodeDecodeError) as err:
                raise UserError(f"{path} is damaged or not JSON ({err}); export or train it again") from None


def model_device(args) -> torch.device:
    """--device checked (a UserError naming the flag for a name torch does not know, or a GPU that is
    not here); None: cuda when available, else cpu."""
    if args.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {args.device!r} is not a device; allowed: cpu, cuda, cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
        if (device.index or 0) >= count:
            raise UserError(f"--device {args.device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type != "cpu":
        raise UserError(f"--device {args.device!r} is not supported; allowed: cpu, cuda, cuda:N")
    return device


def command_tokenizer(recipe: Recipe | None, adapter: str, override: str | None):
    """The tokenizer of a command (``tokenizer_name``), loaded; a UserError naming --tokenizer (or
    the tokenizer chosen) when it cannot be loaded."""
    name = tokenizer_name(recipe, adapter, override)
    if override and override.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(override)):
        raise UserError(f"--tokenizer {override!r} does not exist (a tokenizer folder, a Hub id, or 'offline')")
    try:
        return load_tokenizer(name)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = f"--tokenizer {override!r}" if override else f"the tokenizer {name!r}"
        raise UserError(f"{where} could not be loaded: {reason}") from None


def load_model(adapter: str, recipe: Recipe | None, args, memory_overrides: dict) -> RMTModel:
    """RMTModel.from_pretrained with the recipe's quantization / dtype / attention unless flags
    (``options.add_model_options``) say otherwise; ``memory_overrides`` (MemoryConfig fields)
    change how inputs are read."""
    model = recipe.model if recipe is not None else None
    device = model_device(args)
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype!r} is not allowed; allowed: {sorted(DTYPES)}")
    kwargs = {"quantization": args.quantization or (model.quantization if model else None),
              "dtype": args.dtype or (model.dtype if model else None)}
    if model is not None and model.attention:
        kwargs["attn_implementation"] = model.attention
    if model is not None and not args.quantization:
        kwargs["quantization_backend"] = model.quantization_backend
    if args.base_model:
        kwargs["base_model"] = args.base_model
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    check_weight_files(adapter)
    try:
        rmt = RMTModel.from_pretrained(adapter, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        # OSError: a Hub id that is unknown or unreachable (offline), a base model that moved; ValueError /
        # TypeError: files that do not belong together (--base-model on full weights, a memory config
        # with fields this version does not know, a backbone of another kind)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load {adapter}: {first}") from None
    if device.type != "cuda":
        rmt.to(device)
    if memory_overrides:
        if "num_memory_tokens" in memory_overrides:
            raise UserError("memory.num_memory_tokens cannot be overridden at evaluation: the memory was "
                            "trained with that many tokens")
        rmt.memory_config = dataclasses.replace(rmt.memory_config, **memory_overrides)
        try:
            check_position_limit(rmt.causal_lm.config, rmt.memory_config)
        except ValueError as err:
            raise UserError(f"memory overrides {sorted(memory_overrides)}: {err}") from None
    return rmt.eval()
