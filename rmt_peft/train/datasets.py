"""The samples a recipe trains and evaluates on, per curriculum stage: the data registry's tasks
(``build_dataset``: samples of N segments), checked before any training (``check_stage_data``), or an
instruction dataset for trl's SFTTrainer; the collator that pads a batch for RMTModel.forward.
"""
from __future__ import annotations

import contextlib
import dataclasses

from torch.utils.data import ConcatDataset, Dataset

from ..data.collate import collate
from ..data.registry import build_dataset as registry_build
from ..errors import RecipeError
from ..inputs import MODEL_INPUTS
from ..recipe import Recipe, stage_segments


class DataUnavailable(RecipeError):
    """The data source could not be read at all (a Hub dataset while offline, an unreadable file):
    not a source too small for a stage."""


def build_dataset(recipe: Recipe, tokenizer, segments: list[int], num_samples: int, seed: int) -> Dataset:
    """Samples of every count in ``segments`` (num_samples split evenly), for one stage."""
    parts = []
    for i, n in enumerate(segments):
        count = max(1, num_samples // len(segments))
        try:
            ds = registry_build(recipe.data.task, recipe.data.options, tokenizer=tokenizer,
                                segment_size=recipe.memory.segment_size, num_segments=n,
                                num_samples=count, seed=seed * 1000 + n)
        except OSError as err:  # a Hub dataset offline, a file that cannot be read: nothing to build from
            raise DataUnavailable(f"data.task={recipe.data.task!r}: {err}") from err
        except ValueError as err:  # the data readers name the file, line or option
            raise RecipeError(f"data.task={recipe.data.task!r} with {n} segments: {err}") from err
        if len(ds) == 0:
            raise RecipeError(f"data.task={recipe.data.task!r} with {n} segments produced no usable samples; "
                              f"check data.options")
        parts.append(ds)
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def final_segments(recipe: Recipe) -> list[int]:
    if recipe.eval.num_segments:
        return list(recipe.eval.num_segments)
    return sorted({n for s in recipe.curriculum.stages for n in stage_segments(s)})


def check_stage_data(recipe: Recipe, tokenizer, first_stage: int = 0) -> None:
    """Build one sample of every input length of the curriculum stages from ``first_stage`` on and
    of the final evaluation, before any training: a data source that cannot fill a later stage
    fails now, naming the stage and the shortfall, instead of after hours of the earlier ones."""
    if recipe.trainer != "rmt":  # trl's trainers prepare (and report on) their own rows
        return
    checks: dict[int, str] = {}  # segments -> the first place that needs them
    for i, stage in enumerate(recipe.curriculum.stages):
        for n in stage_segments(stage) if i >= first_stage else []:
            checks.setdefault(n, f"curriculum stage {i} ({n} segments)")
    for n in final_segments(recipe):
        checks.setdefault(n, f"eval.num_segments ({n} segments)")
    for n, what in checks.items():  # in curriculum order: the first stage that cannot be filled is named
        try:
            build_dataset(recipe, tokenizer, [n], 1, recipe.data.seed)[0]
        except DataUnavailable:
            raise
        except OSError as err:  # a source opened lazily, at the first sample
            raise DataUnavailable(f"data.task={recipe.data.task!r}: {err}") from err
        except (ValueError, IndexError) as err:
            raise RecipeError(f"{what}: data.task={recipe.data.task!r} cannot fill {n} segments of "
                              f"{recipe.memory.segment_size} tokens: {err}") from None


@dataclasses.dataclass
class Collator:
    """Pads a batch (``rmt_peft.data.collate``) and keeps only what RMTModel.forward takes."""

    pad_token_id: int = 0
    padding_side: str = "right"

    def __call__(self, samples):
        samples = [{k: s[k] for k in MODEL_INPUTS if k in s} for s in samples]
        return collate(samples, pad_token_id=self.pad_token_id, padding_side=self.padding_side)


@contextlib.contextmanager
def no_datasets_bars():
    """The ``datasets`` library's progress bars off inside (restored after)."""
    from datasets.utils import logging as datasets_logging

    enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            datasets_logging.enable_progress_bar()


def instruction_datasets(recipe: Recipe):
    """Train and eval splits of an instruction dataset (``datasets.load_dataset`` arguments in
    data.options; trl's prompt/completion or messages columns)."""
    from datasets import load_dataset

    options = dict(recipe.data.options)
    eval_split = options.pop("eval_split", None)
    split = options.pop("split", "train")
    train = load_dataset(split=split, **options)
    if len(train) == 0:
        raise RecipeError(f"data.options={recipe.data.options!r}: the {split!r} split has no rows")
    train = train.select(range(min(len(train), recipe.data.num_train_samples)))
    held_out = load_dataset(split=eval_split, **options) if eval_split else train
    return train, held_out.select(range(min(len(held_out), recipe.data.num_eval_samples)))

