"""``rmt-peft eval RUN_OR_ADAPTER_DIR``: the task's curve for a trained run (and its baselines).

RUN_OR_ADAPTER_DIR is a training run (``recipe.yaml`` + ``final/``), an adapter folder (the run's
``recipe.yaml`` is taken from its parent when there is one) or a Hub id. The recipe supplies the
task, its options, the model's quantization / dtype / tokenizer and the eval section's lengths;
flags and ``dotted.key=value`` overrides (applied to the recipe as in training) take precedence.
Writes ``metrics.json``, a CSV per curve and PNG plots to ``--out``, all at once when the evaluation
ends (a folder written beside it, then renamed into place), and prints a short JSON summary
(accuracy or perplexity per length and model) on stdout. The default --out is RUN/eval, or beside
it RUN/eval-2, eval-3, ... when an earlier evaluation is there (never overwritten); an explicit
--out that exists or lies inside a training run needs --overwrite (``rmt_peft.runs.check_output``,
the rule of every command that writes), and a run's own files are never written.

For developers: the run folder is read through ``rmt_peft.runs``; it and the evaluators are
imported when the command runs, so that ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import os

from ..errors import UserError
from ..log import hide_library_progress_bars
from ..options import add_model_options, description

DEFAULT_SEGMENTS = [1, 2, 4, 8, 16, 32]
DEFAULT_SAMPLES = 100
EVAL_SEED_OFFSET = 1000  # evaluation samples differ from the training ones (seeded data.seed)


MAX_LENGTHS = 10_000  # lengths one --segments may list (an ellipsis to 10^11 in steps of one would never end)


def parse_segments(text: str) -> list[int]:
    """"1,2,4,8" or with an ellipsis continuing the progression: "1,2,4,...,4096" (doubling),
    "1,2,3,...,10" (steps of one). Strict: an empty item, an ellipsis without two values before
    it and a larger end after it, or a value < 1 is an error."""
    def error(why: str):
        return argparse.ArgumentTypeError(f"{text!r}: {why}; expected comma-separated integers >= 1, "
                                          f"e.g. 1,2,4,8 or 1,2,4,...,4096")
    parts = [p.strip() for p in text.split(",")]
    if "" in parts:
        raise error("an item is empty")
    values: list[int] = []
    for i, part in enumerate(parts):
        if part != "...":
            try:
                values.append(int(part))
            except ValueError:
                raise error(f"{part!r} is not an integer") from None
            if values[-1] < 1:
                raise error(f"{values[-1]} is < 1")
            continue
        if len(values) < 2 or i + 1 >= len(parts) or parts[i + 1] == "...":
            raise error("'...' needs two values before it and the last value after it")
        a, b = values[-2], values[-1]
        try:
            end = int(parts[i + 1])
        except ValueError:
            raise error(f"{parts[i + 1]!r} is not an integer") from None
        if b <= a or end <= b:
            raise error(f"'...' continues an increasing progression ({a}, {b}) up to a larger end, not {end}")
        geometric = b % a == 0 and b // a > 1
        while True:
            b, a = (b * (b // a), b) if geometric else (b + (b - a), b)
            if b >= end:
                break
            values.append(b)
            if len(values) > MAX_LENGTHS:
                raise error(f"more than {MAX_LENGTHS:,} lengths")
    return sorted(set(values))


def check_counts(args: argparse.Namespace) -> None:
    """--samples / --batch-size / --chunk-size must be >= 1 when given (0 is not 'the default')."""
    for flag in ("samples", "batch_size", "chunk_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} {value}: expected an integer >= 1")


def run(args: argparse.Namespace) -> int:
    # cheap checks first, before transformers and the models load (seconds to minutes)
    check_counts(args)
    from ..data.registry import TASKS, build_dataset

    if args.task is not None and args.task not in TASKS:
        raise UserError(f"--task {args.task!r} is not known; allowed: {list(TASKS)}")
    from .. import loading
    from ..fileio import atomic_directory
    from .runner import evaluate

    if args.no_progress:
        hide_library_progress_bars()  # transformers' "Loading weights" too

    adapter, recipe_path = loading.locate(args.path)
    out = output_folder(args, adapter)
    recipe = loading.read_recipe(recipe_path, args.overrides)
    task, options = task_and_options(args, recipe)
    settings = eval_settings(args, task, recipe)
    seed = args.seed if args.seed is not None else (recipe.data.seed if recipe is not None else 0) + EVAL_SEED_OFFSET
    models = load_models(args, adapter, recipe, settings)
    rmt = next(iter(models.values()))
    # tasks on raw token ids (token_memory) need none
    tokenizer = loading.command_tokenizer(recipe, adapter, args.tokenizer) if TASKS[task].needs_tokenizer else None
    segment_size = rmt.memory_config.segment_size
    check_fits(settings, options, tokenizer, models)

    def build(num_segments: int, num_samples: int):
        return build_dataset(task, options, tokenizer=tokenizer, segment_size=segment_size,
                             num_segments=num_segments, num_samples=num_samples, seed=seed)

    settings.extra = {"run": args.path, "adapter": adapter, "baseline": args.baseline, "task": task,
                      "task_options": options, "seed": seed, "overrides": list(args.overrides),
                      "plain_context": settings.plain_context}
    with atomic_directory(out) as tmp:
        metrics = evaluate(models, build, settings, tmp)
    summary = {name: _headline(settings.curve, result) for name, result in metrics["results"].items()}
    print(json.dumps({"out": out, "curve": settings.curve, "summary": summary}, indent=2))
    return 0


def task_and_options(args: argparse.Namespace, recipe) -> tuple[str, dict]:
    """The task to evaluate and its options (--task / --task-options, else the recipe's), checked
    with --curve and --tokenizer before any model loads."""
    from .. import runs
    from ..data.registry import TASKS, validate_options
    from .runner import curve_for_task

    if recipe is None and args.overrides:
        raise UserError(f"overrides {args.overrides} need a run's {runs.RUN_RECIPE_FILE}; {args.path} has none")
    task = args.task or (recipe.data.task if recipe is not None else None)
    if not task:
        raise UserError(f"no task: pass --task (the adapter has no {runs.RUN_RECIPE_FILE} to take it from)")
    if task not in TASKS:
        raise UserError(f"--task {task!r} is not known; allowed: {list(TASKS)}")
    if args.task_options is not None:
        import yaml

        from ..recipe import safe_load

        try:
            options = safe_load(args.task_options) or {}
        except yaml.YAMLError as err:
            raise UserError(f"--task-options is not YAML / JSON: {' '.join(str(err).split())}") from None
    else:
        options = dict(recipe.data.options) if recipe is not None and recipe.data.task == task else {}
    try:
        validate_options(task, options)
    except (ValueError, TypeError, OSError) as err:
        raise UserError(f"--task-options / data.options of task {task!r}: {err}") from None
    curve = args.curve or curve_for_task(task)
    if curve != "perplexity" and curve != curve_for_task(task):
        # accuracy needs the memory tasks' answers; history, arxiv_lm's history segments
        raise UserError(f"--curve {curve} does not apply to task {task!r}; allowed: {curve_for_task(task)} or "
                        f"perplexity")
    if args.tokenizer is not None and not TASKS[task].needs_tokenizer:
        raise UserError(f"--tokenizer {args.tokenizer!r}: task {task!r} reads raw token ids and takes no tokenizer")
    if curve == "history":
        # Training may mix history sizes (arxiv_lm's history_sizes); the curve needs every sample
        # at the longest history, and scores the shorter ones by reading less of it.
        options.pop("history_sizes", None)
    return task, options


def eval_settings(args: argparse.Namespace, task: str, recipe):
    """The curve, lengths, samples and batches: the flags, else the recipe's eval section, else the defaults."""
    from .runner import EvalSettings, curve_for_task

    eval_section = recipe.eval if recipe is not None else None
    return EvalSettings(
        curve=args.curve or curve_for_task(task),
        segments=args.segments or (list(eval_section.num_segments) if eval_section and eval_section.num_segments
                                   else DEFAULT_SEGMENTS),
        num_samples=args.samples if args.samples is not None else (
            eval_section.num_samples if eval_section and eval_section.num_samples else DEFAULT_SAMPLES),
        batch_size=args.batch_size or (eval_section.batch_size if eval_section and eval_section.batch_size else 1),
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
    )


def load_models(args: argparse.Namespace, adapter: str, recipe, settings) -> dict:
    """The run's model and the baselines' (--baseline, else the run's own baseline/ when it trained
    one), by legend name, read with the run's memory overrides; plain-context baselines are noted
    in ``settings``."""
    from .. import loading, runs

    memory_overrides = {}
    if recipe is not None:
        for item in args.overrides:
            key = item.split("=", 1)[0]
            if key.startswith("memory."):
                field = key.split(".", 1)[1]
                memory_overrides[field] = getattr(recipe.memory, field)
    if args.baseline is None and recipe is not None and recipe.eval.baseline:
        # Training with eval.baseline puts the 0-memory run in RUN/baseline: compare with it.
        trained = runs.baseline_dir(args.path)
        if runs.has_started(trained):
            args.baseline = [trained]
    names: list[str] = []
    models = {}
    paths = [(args.path, adapter, recipe)]
    for baseline in args.baseline or []:
        base_adapter, base_recipe_path = loading.locate(baseline)
        paths.append((baseline, base_adapter, loading.read_recipe(base_recipe_path)))
    for path, folder, folder_recipe in paths:
        name = runs.model_name(path, names)
        names.append(name)
        models[name] = loading.load_model(folder, folder_recipe, args, memory_overrides)
        context = (folder_recipe.data.options or {}).get("history_tokens") if folder_recipe is not None else None
        if context is not None and path != args.path:
            # A plain-context baseline (arxiv_gpt2_context.yaml): history in its window, not in memory.
            settings.plain_context[name] = context
    return models


def check_fits(settings, options: dict, tokenizer, models: dict) -> None:
    """Lengths that fit this machine's memory (by arithmetic, before a sample is built) and token ids
    that fit every model's vocabulary (the task's ``vocab_size``, the tokenizer's)."""
    from ..recipe import RecipeError, check_sample_fits

    for name, rmt in models.items():
        try:
            check_sample_fits(max(settings.segments), rmt.memory_config.segment_size, "--segments / eval.num_segments")
        except RecipeError as err:
            raise UserError(str(err)) from None
        vocab = rmt.causal_lm.get_input_embeddings().num_embeddings
        for what, size in (("--task-options / data.options vocab_size", options.get("vocab_size")),
                           ("the tokenizer's vocabulary", len(tokenizer) if tokenizer is not None else None)):
            if isinstance(size, int) and size > vocab:
                raise UserError(f"{what} ({size} tokens) is larger than the vocabulary of {name} ({vocab}): token ids "
                                f"from {vocab} on have no embedding")


def output_folder(args: argparse.Namespace, adapter: str) -> str:
    """--out, checked; or the first free of RUN/eval, RUN/eval-2, ... (the run of ``args.path``, else
    the adapter folder, else the current folder for a Hub id)."""
    from .. import runs

    if args.out is not None:
        runs.check_output(args.out, "--out", args.overwrite, folder=True, own=runs.EVAL_DIRS)
        return args.out
    if runs.is_run(args.path):
        base = args.path
    elif os.path.isdir(adapter):
        base = runs.run_folder(adapter) or adapter
    else:
        base = "."
    out = runs.free_eval_dir(base)
    runs.check_output(out, "--out", folder=True, own=runs.EVAL_DIRS)
    return out


def _headline(curve: str, result) -> dict:
    """The numbers a reader looks for first, per model."""
    if curve == "accuracy":
        return {str(p["num_segments"]): round(p["accuracy"], 4) for p in result}
    if curve == "history":
        return {str(h): round(v, 3) for h, v in result["perplexity"].items()}
    return {str(p["num_segments"]): [round(p["perplexity_all"], 3), round(p["perplexity_last_segment"], 3)]
            for p in result}


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="curves of a trained run: accuracy / perplexity vs length",
                              description=description(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_OR_ADAPTER_DIR", help="a training run, an adapter folder or a Hub id")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, e.g. data.options.noise=pg19 memory.segment_alignment=left")
    p.add_argument("--task", help="a data registry task (default: the recipe's)")
    p.add_argument("--task-options", help="the task's options as YAML / JSON (default: the recipe's)")
    p.add_argument("--curve", choices=("accuracy", "history", "perplexity"),
                   help="default: accuracy for memory tasks, history for arxiv_lm, perplexity otherwise")
    p.add_argument("--segments", type=parse_segments,
                   help="numbers of segments, e.g. 1,2,4,...,4096 (history curves: history + 1); "
                        f"default: the recipe's eval.num_segments or {','.join(map(str, DEFAULT_SEGMENTS))}")
    p.add_argument("--samples", type=int, help=f"samples per length (default: recipe or {DEFAULT_SAMPLES})")
    p.add_argument("--batch-size", type=int, help="memory tasks: samples read together (default 1)")
    p.add_argument("--chunk-size", type=int, help="tokens pushed into the stream at a time (default 16 segments)")
    p.add_argument("--baseline", metavar="DIR", action="append",
                   help="a no-memory run / adapter evaluated on the same samples; repeat for more (Fig. 8: the "
                        "plain-context runs of arxiv_gpt2_context.yaml) (default: RUN/baseline when the recipe "
                        "trained one)")
    p.add_argument("--out", help="output folder (default: RUN/eval, or RUN/eval-2, ... beside an earlier one)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (never a training run's own files)")
    p.add_argument("--seed", type=int, help=f"sample seed (default: the recipe's data.seed + {EVAL_SEED_OFFSET})")
    add_model_options(p)
    p.set_defaults(func=run)

