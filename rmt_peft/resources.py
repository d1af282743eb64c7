"""The recipes and DeepSpeed configs: ``recipes/*.yaml`` and ``deepspeed_configs/*.json`` at the top of
the repository (the files people read, copy and edit), shipped inside the wheel as
``rmt_peft/recipes`` and ``rmt_peft/deepspeed_configs`` (pyproject.toml maps them). An installed
package reads its own copies through ``importlib.resources``; a checkout (the package imported from
its source folder) reads the repository's folders, so every command finds them from any folder.

A recipe is named by its file name without ``.yaml`` (``quickstart``); ``recipes/quickstart.yaml``
names it too, so commands written for a checkout keep working anywhere. Cheap to import:
``rmt-peft --help`` uses it.
"""
from __future__ import annotations

import os
import re
from importlib import resources

RECIPES = "recipes"
DEEPSPEED_CONFIGS = "deepspeed_configs"
SUFFIXES = {RECIPES: ".yaml", DEEPSPEED_CONFIGS: ".json"}


def _folder(kind: str):
    """The installed package's copy of the ``kind`` folder, else the checkout's (beside the package)."""
    installed = resources.files("rmt_peft") / kind
    if installed.is_dir():
        return installed
    return resources.files("rmt_peft").parent / kind


def names(kind: str) -> list[str]:
    """Sorted names (file names without suffix) of the shipped ``kind`` files."""
    suffix = SUFFIXES[kind]
    return sorted(f.name[:-len(suffix)] for f in _folder(kind).iterdir() if f.name.endswith(suffix))


def path(kind: str, name: str) -> str | None:
    """The file of the shipped ``name`` (with or without its suffix), or None when none ships."""
    suffix = SUFFIXES[kind]
    stem = name[:-len(suffix)] if name.endswith(suffix) else name
    if stem not in names(kind):
        return None
    # a regular install (wheel or checkout) keeps package data as files: a real path
    return os.fspath(_folder(kind) / (stem + suffix))


def recipe_path(value: str) -> str | None:
    """The shipped recipe that ``value`` names: ``quickstart``, ``quickstart.yaml`` or
    ``recipes/quickstart.yaml``; None when it names none (``value`` is then a path of the user's)."""
    folder, name = os.path.split(os.path.normpath(value))
    if folder not in ("", RECIPES):
        return None
    return path(RECIPES, name)


def describe_recipe(file: str) -> str:
    """The first sentence of a recipe's leading comment (what it trains), whole."""
    lines = []
    with open(file, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#") or line.startswith("#  "):  # the YAML, or an indented example command
                break
            lines.append(line.strip("# \n"))
    text = " ".join(part for part in lines if part)
    end = re.search(r"\.(\s|$)", text)
    return text[:end.start() + 1] if end else text
