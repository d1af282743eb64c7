"""The lint rules and the layering of the package (pyproject.toml's [tool.ruff] and
[tool.importlinter]), short functions, the run folder's names in one module, and tests that mirror
the package; scripts/test.sh runs the first two commands before pytest:

    .venv/bin/ruff check .
    .venv/bin/lint-imports
"""
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool(name: str) -> str:
    path = os.path.join(os.path.dirname(sys.executable), name)
    found = path if os.path.exists(path) else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return found


def test_ruff_rules_hold():
    result = subprocess.run([tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_layering_holds():
    result = subprocess.run([tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_module_has_a_layer():
    """A new module must be placed in the layers contract, or the contract would not see it."""
    import rmt_peft

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    placed = {name for layer in layers for name in re.split(r"[|:]", layer.replace(" ", ""))}
    modules = {f"rmt_peft.{m.name}" for m in pkgutil.iter_modules(rmt_peft.__path__)}
    assert modules - placed == set(), "modules missing from [tool.importlinter]'s layers"


def test_moved_modules_keep_their_old_import_paths():
    import rmt_peft.recipe
    from rmt_peft.train.recipe import RecipeError, Stage, load_recipe

    assert (load_recipe, RecipeError, Stage) == (rmt_peft.recipe.load_recipe, rmt_peft.recipe.RecipeError,
                                                 rmt_peft.recipe.Stage)


RUN_FOLDER_NAMES = ("recipe.yaml", "summary.json", "kept.json", ".rmt-peft.lock", "curriculum.json",
                    "trainable.safetensors", "trainer_state.json", "stage-", "checkpoint-", "suspect-", "final/",
                    "best/", "logs/", "baseline/", "eval/", "end/")


def string_literals(path: str):
    """(line, text) of the string constants of a module, docstrings left out."""
    import ast

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_the_run_folders_names_are_spelled_in_runs_py_only():
    """Every other module asks rmt_peft.runs for a run folder's names and paths."""
    package = os.path.join(ROOT, "rmt_peft")
    found = []
    for folder, _, files in os.walk(package):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or path == os.path.join(package, "runs.py"):
                continue
            found += [f"{os.path.relpath(path, ROOT)}:{line}: {text!r}" for line, text in string_literals(path)
                      if any(re.search(rf"(?<![\w.]){re.escape(n)}", text) for n in RUN_FOLDER_NAMES)]
    assert found == []
    assert any("stage-" in text for _, text in string_literals(os.path.join(package, "runs.py")))


def test_no_function_is_longer_than_80_lines():
    """Each function reads in one screen (docstring included)."""
    import ast

    long = []
    for folder, _, files in os.walk(os.path.join(ROOT, "rmt_peft")):
        for name in (n for n in files if n.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            long += [f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
                     for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                     and node.end_lineno - node.lineno + 1 > 80]
    assert long == []


# Modules with functions or classes but no test module of their own: each says why.
NO_MIRRORED_TESTS = {
    "errors.py": "exception types only; every test of a failure checks them",
}


def test_every_module_with_logic_has_a_test_module_at_the_same_path():
    """rmt_peft/X.py -> tests/test_X.py, rmt_peft/train/X.py -> tests/train/test_X.py, ... (the
    tests mirror the package); package files and re-export shims hold no logic of their own."""
    import ast

    package = os.path.join(ROOT, "rmt_peft")
    missing = []
    for folder, _, files in os.walk(package):
        for name in sorted(n for n in files if n.endswith(".py") and n not in ("__init__.py", "__main__.py")):
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, package)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            if relative in NO_MIRRORED_TESTS or not any(
                    isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for node in tree.body):
                continue
            test = os.path.join(ROOT, "tests", os.path.dirname(relative), f"test_{name}")
            if not os.path.isfile(test):
                missing.append(f"{relative} -> {os.path.relpath(test, ROOT)}")
    assert missing == []
    assert all(os.path.isfile(os.path.join(package, name)) for name in NO_MIRRORED_TESTS)  # no stale entries
