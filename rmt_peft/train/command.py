"""``rmt-peft train RECIPE [key=value ...]``, ``rmt-peft validate RECIPE [key=value ...]`` and
``rmt-peft recipes [NAME [--to FILE]]``.

RECIPE is a YAML file or the name of a shipped recipe (``quickstart``; ``rmt-peft recipes`` lists
them and copies one out to edit). Overrides are ``dotted.key=value`` with YAML values, e.g.
``training.learning_rate=1e-4`` ``curriculum.segments=[1,2,4]``. ``validate`` checks the recipe
without loading any weights and exits 0 when it is valid, 2 when it is not (the message names
the key, the value and what is allowed). ``train`` accepts the ``--local_rank`` that the
deepspeed launcher appends (``python -m rmt_peft.train`` is the launchers' entry). A start
that fails before training begins (nothing written but recipe.yaml) removes the output folder it
created, so the same ``output_dir`` can be used again. The recipe, the engine and the run folder
(``rmt_peft.runs``) are imported inside the handlers, with torch, so that ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap

from .. import resources
from ..errors import UserError

RECIPE_HELP = "a recipe YAML file, or the name of a shipped one (rmt-peft recipes), e.g. quickstart"
EXIT_DIVERGED = 3  # the divergence guard stopped the run (a user error is 2)


def register(subparsers) -> None:
    for name, func, help_text in (
            ("train", train_command, "train from a YAML recipe (curriculum, Trainer, DeepSpeed)"),
            ("validate", validate_command, "check a recipe without loading any model weights")):
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("recipe", help=RECIPE_HELP)
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help="dotted.key=value overrides, values parsed as YAML (training.max_steps=10)")
        parser.set_defaults(func=func)
        if name == "train":  # appended by the deepspeed launcher; the rank is read from LOCAL_RANK
            parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    text = "list the shipped recipes and DeepSpeed configs, or copy one out to edit"
    parser = subparsers.add_parser("recipes", help=text, description=text)
    parser.add_argument("name", nargs="?", help="a shipped recipe or DeepSpeed config to copy")
    parser.add_argument("--to", metavar="FILE", help="where to copy it (default: NAME.yaml / NAME.json here)")
    parser.set_defaults(func=recipes_command)


def _load(args):
    from ..recipe import RecipeError, load_recipe
    from ..runs import check_train_output

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        check_train_output(recipe.output_dir)  # not the current folder, not inside another run
    except UserError as err:
        raise RecipeError(f"invalid recipe {args.recipe}: {err}") from err
    return recipe


def validate_command(args) -> int:
    """One outcome: "RECIPE: valid (...)" on stdout and exit 0, or one error line and exit 2;
    what could not be checked here (offline) is a note on stderr."""
    recipe = _load(args)
    from ..recipe import model_config, stage_segments

    if model_config(recipe.model) is None:
        note(f"the config of {recipe.model.name_or_path} could not be read here (offline?): the position limit is "
             f"checked when the model loads")
    filled = _check_data(args, recipe)
    stages = ", ".join(f"{stage_segments(s)}x{s.max_steps or 'max'}" for s in recipe.curriculum.stages)
    print(f"{args.recipe}: valid ({recipe.model.name_or_path}, task {recipe.data.task}, "
          f"{recipe.memory.num_memory_tokens} memory tokens, segment {recipe.memory.segment_size}, "
          f"stages [segments x steps] {stages}, output {recipe.output_dir}"
          + (f", deepspeed {recipe.keys.deepspeed}" if recipe.keys.deepspeed else "") + ")"
          + ("; the data fills every stage" if filled else ""))
    return 0


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def _check_data(args, recipe) -> bool:
    """Whether the data fills every stage (needs the tokenizer and the data source; without them,
    training checks first): True when checked, a RecipeError when it does not."""
    from ..recipe import RecipeError
    from .build import build_tokenizer
    from .datasets import DataUnavailable, check_stage_data

    if recipe.trainer != "rmt":  # trl's trainers prepare their own rows when training starts
        return False
    try:
        tokenizer = build_tokenizer(recipe)
    except (OSError, UserError):  # UserError: a Hub tokenizer not in the cache while offline
        note("the tokenizer could not be loaded here (offline?): whether the data fills every stage is checked "
             "when training starts")
        return False
    try:
        check_stage_data(recipe, tokenizer)
    except DataUnavailable as err:  # a Hub data source while offline, for instance
        note(f"{err}; whether the data fills every stage is checked when training starts")
        return False
    except RecipeError as err:
        raise RecipeError(f"invalid recipe {args.recipe}: {err}") from err
    return True


def train_command(args) -> int:
    recipe = _load(args)
    from ..errors import TrainingDiverged
    from ..log import is_main_process, logger
    from ..runs import RUN_SUMMARY_FILE, remove_failed_start
    from .trainer import run

    out = recipe.output_dir
    fresh = not os.path.isdir(out) or not os.listdir(out)
    try:
        run(recipe, log=logger.info)
    except TrainingDiverged as err:  # summary.json in the output folder records it
        print(f"rmt-peft train: {err} (recorded in {recipe.output_dir}/{RUN_SUMMARY_FILE})", file=sys.stderr)
        return EXIT_DIVERGED
    except BaseException:
        if fresh and is_main_process():
            remove_failed_start(out)
        raise
    return 0


def recipes_command(args) -> int:
    if args.name is None:
        print("recipes (rmt-peft train NAME, or rmt-peft recipes NAME to copy one out and edit it):")
        names = resources.names(resources.RECIPES)
        width = max(map(len, names)) + 2
        columns = max(shutil.get_terminal_size().columns, width + 40)
        for name in names:
            description = resources.describe_recipe(resources.path(resources.RECIPES, name))
            print(textwrap.fill(description, columns, initial_indent=f"  {name:<{width}}",
                                subsequent_indent=" " * (width + 2)))
        print("DeepSpeed configs (training.deepspeed=NAME): " + ", ".join(resources.names(resources.DEEPSPEED_CONFIGS)))
        return 0
    for kind in (resources.RECIPES, resources.DEEPSPEED_CONFIGS):
        source = resources.path(kind, args.name)
        if source is not None:
            break
    else:
        raise UserError(f"{args.name!r} is not a shipped recipe or DeepSpeed config; allowed: "
                        f"{resources.names(resources.RECIPES) + resources.names(resources.DEEPSPEED_CONFIGS)}")
    target = args.to or os.path.basename(source)
    if os.path.exists(target):
        raise UserError(f"--to {target} already exists; nothing is overwritten: choose another file")
    shutil.copyfile(source, target)
    use = (f"rmt-peft train {target}" if kind == resources.RECIPES else
           f"rmt-peft train RECIPE training.deepspeed={target}")
    print(f"wrote {target} (from {source}); use it with: {use}")
    return 0
