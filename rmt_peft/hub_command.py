"""``rmt-peft export``: ship a trained adapter as a folder, a merged model or a Hub repo.

    rmt-peft export RUN_OR_ADAPTER_DIR --to DIR [--merge] [--push-to-hub REPO_ID]

RUN_OR_ADAPTER_DIR is a training run's OUTPUT_DIR (its ``final/`` adapter is used) or an
adapter folder. Without --merge the folder is checked (complete, memory matching its config)
and copied with a fresh model card; no model is loaded. With --merge the backbone is loaded
(by default with the quantization the adapter was trained with, as recorded in
memory.safetensors), LoRA is merged into a bf16 copy and full weights are written: the result
loads with ``RMTModel.from_pretrained`` without peft. Other files of the source folder
(tokenizer files, for instance) travel along. --push-to-hub uploads the written folder.

Export never deletes what it did not write (``rmt_peft.runs.check_output``, the rule of every
command that writes): a --to folder that exists and is not empty, or lies inside a training run,
is refused unless --overwrite is given; an empty --to, the current folder, a training run, a run's
own files (stages, checkpoints, logs, final weights), a folder holding a run, the source and the
inside of the adapter folder are always refused. The folder is written beside the target and
renamed into place.

For developers: what a source path is: ``rmt_peft.loading.adapter_folder``; torch and the model
code are imported when the command runs, so that ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from safetensors import SafetensorError

from .errors import UserError
from .fileio import disk_error
from .options import description

QUANTIZATION_CHOICES = ("as-trained", "none", "8bit", "4bit")


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="copy / merge a trained adapter and optionally push it to the Hub",
                              description=description(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RUN_OR_ADAPTER_DIR",
                   help="a training run's OUTPUT_DIR (uses OUTPUT_DIR/final) or an adapter folder")
    p.add_argument("--to", required=True, metavar="DIR",
                   help="folder to write (must be new or empty; written beside it, then renamed into place)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --to folder (never the source run or a folder holding it)")
    p.add_argument("--merge", action="store_true", help="merge LoRA into a bf16 copy of the backbone")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the written folder to this Hub repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--token", help="Hugging Face token (default: the logged-in one / HF_TOKEN)")
    p.add_argument("--base-model", help="load this base instead of adapter_config.json's (--merge)")
    p.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default="as-trained",
                   help="how to load the backbone before merging (default: as the adapter was trained)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the merged weights")
    p.set_defaults(func=run_export)


def exported_files(folder: str) -> list[str]:
    """Top-level files of an adapter ``folder`` that a user needs (no resume state)."""
    from .runs import is_resume_file

    return [n for n in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, n)) and not is_resume_file(n)]


def extra_files(folder: str) -> list[str]:
    """Top-level files of an adapter ``folder`` that a merged model keeps (tokenizer files, ...)."""
    from .saving import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILES, CARD_FILE, MEMORY_CONFIG_FILE,
                         MEMORY_WEIGHTS_FILE, MODEL_CONFIG_FILE)

    replaced = {CARD_FILE, MEMORY_CONFIG_FILE, MEMORY_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, *ADAPTER_WEIGHTS_FILES,
                MODEL_CONFIG_FILE, "generation_config.json"}
    return [os.path.join(folder, n) for n in exported_files(folder) if n not in replaced and not n.startswith("model")]


def inside(path: str, folder: str) -> bool:
    """True when ``path`` is ``folder`` or lies under it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_target(source: str, folder: str, to: str, overwrite: bool) -> None:
    """The rule of every command that writes (``runs.check_output``: never the current folder, a
    run's own files or a folder holding a run; an existing folder only with --overwrite), and
    never the source, a folder holding it, or the inside of the adapter folder."""
    from .runs import check_not_current_folder, check_output

    if to and to.strip():
        check_not_current_folder(to, "--to")
        for path in (source, folder):
            if inside(path, to):
                raise UserError(f"--to {to} is the source {path} or a folder holding it: exporting there would "
                                f"replace it; choose another folder (--overwrite does not change this)")
        if inside(to, folder):
            raise UserError(f"--to {to} lies inside the adapter folder {folder}; choose a folder outside it")
    check_output(to, "--to", overwrite, folder=True)


def export(source: str, to: str, merge: bool = False, push_to_hub: str | None = None, private: bool = False,
           token: str | None = None, base_model: str | None = None, quantization: str = "as-trained",
           dtype: str = "bfloat16", overwrite: bool = False) -> str:
    """What the ``export`` command does; returns the written folder."""
    from . import hub, saving
    from .backbones import resolve_dtype
    from .card import write_model_card
    from .fileio import atomic_directory
    from .loading import adapter_folder, check_weight_files
    from .recurrent import RMTModel
    from .runs import run_folder

    folder = adapter_folder(source)
    check_target(source, folder, to, overwrite)
    kind = saving.folder_kind(folder)
    check_weight_files(folder)  # a truncated file is named, as eval and ask name it
    saving.read_memory(folder)  # raises when the memory does not match its config
    if merge:
        if kind != "lora":
            raise ValueError(f"{folder} holds full model weights, not a LoRA adapter: there is nothing to merge")
        metadata = saving.read_metadata(folder)
        options = {}
        if quantization == "as-trained":
            quantization = metadata.get("quantization", "none")
            options = json.loads(metadata.get("quantization_options") or "{}")
        rmt = RMTModel.from_pretrained(folder, quantization=None if quantization == "none" else quantization,
                                       base_model=base_model, **options)
        merged = rmt.merge_and_unload(resolve_dtype(dtype))
        merged.save_pretrained(to, repo_id=push_to_hub, extra_files=extra_files(folder))
        write_model_card(to, push_to_hub, run_dir=run_folder(folder))
    else:
        with atomic_directory(to) as tmp:
            for name in exported_files(folder):
                shutil.copy2(os.path.join(folder, name), os.path.join(tmp, name))
            write_model_card(tmp, push_to_hub, run_dir=run_folder(folder))
    if push_to_hub:
        saving.validate_folder(to)
        hub.upload(to, push_to_hub, private=private or None, token=token)
    return to


def run_export(args) -> int:
    try:
        to = export(args.source, args.to, merge=args.merge, push_to_hub=args.push_to_hub, private=args.private,
                    token=args.token, base_model=args.base_model, quantization=args.quantization, dtype=args.dtype,
                    overwrite=args.overwrite)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # bad input: the message says what is wrong
        if args.verbosity > 0:
            raise
        print(f"rmt-peft export: error: {disk_error(err)}", file=sys.stderr)
        return 2
    from .saving import folder_kind

    what = ("merged model (full weights + memory)" if args.merge else "adapter (LoRA + memory)"
            if folder_kind(to) == "lora" else "model (full weights + memory)")
    print(f"wrote {what} to {to}" + (f" and pushed it to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0
