"""``rmt-peft train RECIPE [key=value ...]`` and ``rmt-peft validate RECIPE [key=value ...]``.

Overrides are ``dotted.key=value`` with YAML values, e.g. ``training.learning_rate=1e-4``
``curriculum.segments=[1,2,4]``. ``validate`` checks the recipe without loading any weights and
exits 0 when it is valid, 2 when it is not (the message names the key, the value and what is
allowed). Heavy imports happen inside the handlers so ``rmt-peft --help`` stays fast.
"""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    for name, func, help_text in (
            ("train", train_command, "train from a YAML recipe (curriculum, Trainer, DeepSpeed)"),
            ("validate", validate_command, "check a recipe without loading any model weights")):
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("recipe", help="a recipe YAML file, e.g. recipes/quickstart.yaml")
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help="dotted.key=value overrides, values parsed as YAML (training.max_steps=10)")
        parser.set_defaults(func=func)


def _load(args):
    from .recipe import RecipeError, load_recipe

    try:
        return load_recipe(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"invalid recipe {args.recipe}: {err}", file=sys.stderr)
        return None


def validate_command(args) -> int:
    recipe = _load(args)
    if recipe is None:
        return 2
    from .recipe import model_config, stage_segments

    stages = ", ".join(f"{stage_segments(s)}x{s.max_steps or 'max'}" for s in recipe.curriculum.stages)
    print(f"{args.recipe}: valid ({recipe.model.name_or_path}, task {recipe.data.task}, "
          f"{recipe.memory.num_memory_tokens} memory tokens, segment {recipe.memory.segment_size}, "
          f"stages [segments x steps] {stages}, output {recipe.output_dir})")
    if model_config(recipe.model) is None:
        print(f"note: the config of {recipe.model.name_or_path} could not be read here (offline?): the position "
              f"limit is checked when the model loads")
    return _check_data(args, recipe)


def _check_data(args, recipe) -> int:
    """Whether the data fills every stage (needs the tokenizer; without it, training checks first)."""
    from .recipe import RecipeError
    from .trainer import build_tokenizer, check_stage_data

    if recipe.trainer != "rmt":  # trl's trainers prepare their own rows when training starts
        return 0
    try:
        tokenizer = build_tokenizer(recipe)
    except OSError:
        print("note: the tokenizer could not be loaded here (offline?): whether the data fills every stage is "
              "checked when training starts")
        return 0
    try:
        check_stage_data(recipe, tokenizer)
    except RecipeError as err:
        print(f"invalid recipe {args.recipe}: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a Hub data source while offline, for instance
        print(f"note: the data could not be read here ({err}): whether it fills every stage is checked when "
              "training starts")
        return 0
    print("data: every stage can be filled")
    return 0


def train_command(args) -> int:
    recipe = _load(args)
    if recipe is None:
        return 2
    from .recipe import RecipeError
    from .trainer import run

    try:
        run(recipe)
    except RecipeError as err:
        print(f"cannot run {args.recipe}: {err}", file=sys.stderr)
        return 2
    return 0
