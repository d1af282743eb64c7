"""What eval, ask and export open from a run: what a path names (a run, an adapter folder or a
Hub id: ``locate``, ``adapter_folder``), the run's recipe, its tokenizer (``tokenizer_name``: the
same precedence for training and loading) and its model, loaded with the recipe's settings
(``load_model``; its flags are in ``options.py``). The run folder itself is ``runs.py``'s.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
from transformers import AutoTokenizer

from . import runs
from .backbones import DTYPES, check_position_limit
from .data.tokenizer import offline_tokenizer
from .errors import UserError
from .fileio import safetensors_problem
from .hub import looks_like_path
from .recipe import Recipe, load_recipe
from .recurrent import RMTModel
from .saving import ADAPTER_CONFIG_FILE, MEMORY_CONFIG_FILE, MODEL_CONFIG_FILE, recorded_base

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # transformers': a folder that holds its own tokenizer
OFFLINE_TOKENIZER = "offline"                     # model.tokenizer / --tokenizer: the data package's


# -- what a path is -------------------------------------------------------------------------
def locate(path: str) -> tuple[str, str | None]:
    """(adapter folder or Hub id, recipe.yaml path or None) of a run, an adapter folder or a Hub id
    (eval, ask: a UserError names what ``path`` is not)."""
    if runs.is_run(path):
        return runs.final_dir(path), runs.recipe_path(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, MEMORY_CONFIG_FILE)):
            raise UserError(f"{path} is neither a training run ({runs.RUN_RECIPE_FILE} + {runs.FINAL_DIR}/) nor an "
                            f"adapter folder ({MEMORY_CONFIG_FILE})")
        return path, runs.run_recipe(path)
    if looks_like_path(path):
        raise UserError(f"{path} is not a folder (expected a training run, an adapter folder or a Hub id "
                        f"like user/model)")
    return path, None  # a Hub id


def adapter_folder(source: str) -> str:
    """``source`` itself when it holds a saved model, else its ``final/`` (a training run); export
    reads local folders only (FileNotFoundError names what ``source`` is not)."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source} is not a folder (expected a run's OUTPUT_DIR or an adapter folder)")
    markers = (ADAPTER_CONFIG_FILE, MODEL_CONFIG_FILE, MEMORY_CONFIG_FILE)
    if any(os.path.isfile(os.path.join(source, m)) for m in markers):
        return source
    final = runs.final_dir(source)
    if os.path.isdir(final):
        return final
    raise FileNotFoundError(f"{source} is neither an adapter folder (no {ADAPTER_CONFIG_FILE} / "
                            f"{MEMORY_CONFIG_FILE}) nor a training run (no {os.path.basename(final)}/ folder)")


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
    return recorded_base(adapter) or adapter


# -- loading a run's model ------------------------------------------------------------------
def check_weight_files(folder: str) -> None:
    """A UserError naming the first .safetensors file of ``folder`` whose header cannot be read, or
    .json file that does not parse (a truncated or hand-edited memory_config.json, ...)."""
    if not os.path.isdir(folder):
        return  # a Hub id
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            problem = safetensors_problem(path)
            if problem is not None:
                raise UserError(f"{path} is damaged or not a safetensors file ({problem}); export or train it "
                                f"again")
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
    if override and looks_like_path(override) and not os.path.exists(os.path.expanduser(override)):
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
        kwargs["quantize_embeddings"] = model.quantize_embeddings
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
