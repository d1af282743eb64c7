"""Command-line options that several commands share. argparse only: the commands add them while
``rmt-peft --help`` runs, which must not import torch."""
from __future__ import annotations

import argparse
import re

DEVELOPER_NOTES = "For developers:"  # a command module's docstring from here on is not --help text


def description(doc: str) -> str:
    """A command's --help text from its module docstring: the part before ``DEVELOPER_NOTES``,
    without reST markup (``code`` reads as code)."""
    text = doc.split(DEVELOPER_NOTES)[0].strip()
    return re.sub(r"``([^`]+)``", r"\1", text)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """How a run or adapter is loaded (eval and ask; ``loading.load_model`` and ``loading.tokenizer_name``
    read them)."""
    p.add_argument("--quantization", choices=("8bit", "4bit", "fp8"), help="default: the recipe's")
    p.add_argument("--dtype", help="default: the recipe's")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--base-model", help="the backbone of a LoRA adapter, when it moved")
    p.add_argument("--tokenizer", help="a tokenizer name / folder, or 'offline' (default: recipe, adapter, base)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
