"""Error types shared by every command.

``UserError`` is a mistake in what the user gave (a file, a recipe key, an argument): commands
report it as one line naming that file, key or argument, with exit code 2, and no traceback.
``RecipeError`` is one in a recipe (recipe.py checks most; the run folder refuses an output folder
a run cannot start in).
``TrainingDiverged`` is a run that broke while training (a non-finite or exploding loss): the
run stops with a non-zero exit code and records what happened, instead of ending with a broken
model that looks fine.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the message names the file, key or argument and what is allowed."""


class RecipeError(UserError):
    """A recipe that cannot run; the message names the key, the value and what is allowed."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became non-finite, or exploded, during training."""
