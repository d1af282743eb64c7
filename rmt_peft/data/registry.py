"""Task name + options -> dataset: the single entry point recipes, training and evaluation use.

A recipe's ``data:`` section names a task and an options dict::

    data:
      task: babilong_reasoning
      options: {noise: pg19, reasoning_kind: relations}

``build_dataset(task, options, tokenizer=..., segment_size=..., num_segments=..., num_samples=...,
seed=...)`` validates the options against the task's options dataclass (an unknown option is an
error listing the allowed ones; a bad value, an error naming the option and its allowed values)
and returns a torch Dataset of dicts of 1-D LongTensors ``input_ids``, ``attention_mask``,
``labels`` (+ ``answer_ids`` for the memory tasks). ``validate_options`` checks a recipe without
building anything (no file or Hub access beyond checking that named files exist).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from .arxiv_lm import ArxivLMOptions, HistoryLMDataset
from .associative_retrieval import AssociativeRetrievalDataset, AssociativeRetrievalOptions, vocab_needed
from .babilong import MemoryTaskDataset, MemoryTaskOptions, ReasoningTaskOptions
from .babilong_hub import BabilongHubDataset, BabilongHubOptions
from .lean import LeanDataset, LeanOptions
from ..hub import hub_repo_id
from ..inputs import IGNORE_INDEX
from .noise import PRESETS
from .token_memory import TokenMemoryTask


@dataclass
class TokenMemoryOptions:
    """token_memory: ``num_values`` answers to choose from, ``vocab_size`` of the raw token ids."""

    num_values: int = 10
    vocab_size: int = 128

    def __post_init__(self):
        for name in ("num_values", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")


class WithAnswerIds(Dataset):
    """Adds ``answer_ids`` (the labelled tokens) to a memory dataset's samples."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = dict(self.dataset[index])
        sample["answer_ids"] = sample["labels"][sample["labels"] != IGNORE_INDEX].clone()
        return sample


@dataclass(frozen=True)
class Task:
    options: type
    build: Callable[..., Dataset]
    needs_tokenizer: bool = True
    # tasks on raw token ids: how many ids their samples use (the model's vocabulary must hold them)
    token_ids: Callable[..., int] | None = None


def _token_memory(options, *, tokenizer, segment_size, num_segments, num_samples, seed):
    return WithAnswerIds(TokenMemoryTask(num_samples, num_segments, segment_size, options.num_values,
                                         options.vocab_size, seed))


def _associative_retrieval(options, *, tokenizer, segment_size, num_segments, num_samples, seed):
    return AssociativeRetrievalDataset(options, segment_size=segment_size, num_segments=num_segments,
                                       num_samples=num_samples, seed=seed)


def _memory_task(name):
    def build(options, **kwargs):
        return MemoryTaskDataset(name, options, **kwargs)
    return build


TASKS: dict[str, Task] = {
    "token_memory": Task(TokenMemoryOptions, _token_memory, needs_tokenizer=False,
                         token_ids=lambda options: options.vocab_size),
    "associative_retrieval": Task(AssociativeRetrievalOptions, _associative_retrieval, needs_tokenizer=False,
                                  token_ids=vocab_needed),
    "babilong_memorize": Task(MemoryTaskOptions, _memory_task("babilong_memorize")),
    "babilong_detect": Task(MemoryTaskOptions, _memory_task("babilong_detect")),
    "babilong_reasoning": Task(ReasoningTaskOptions, _memory_task("babilong_reasoning")),
    "babilong_hub": Task(BabilongHubOptions, lambda options, **kwargs: BabilongHubDataset(options, **kwargs)),
    "arxiv_lm": Task(ArxivLMOptions, lambda options, **kwargs: HistoryLMDataset(options, **kwargs)),
    "lean": Task(LeanOptions, lambda options, **kwargs: LeanDataset(options, **kwargs)),
}


MEMORY_TASKS = tuple(name for name in TASKS if name in ("token_memory", "associative_retrieval")
                     or name.startswith("babilong_"))
"""Tasks whose samples carry ``answer_ids``: evaluate them by generation and exact match."""


def validate_options(task: str, options: dict | None):
    """The task's options dataclass built from ``options``; raises ValueError on any bad entry."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not known; allowed: {tuple(TASKS)}")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ValueError(f"options of task {task!r} must be a dict, got {type(options).__name__}")
    spec = TASKS[task].options
    allowed = tuple(f.name for f in dataclasses.fields(spec))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"task {task!r}: unknown option(s) {unknown}; allowed: {allowed}")
    return spec(**options)


def token_ids_needed(task: str, options: dict | None) -> int | None:
    """How many token ids the samples of a raw-token task use (None: the task uses a tokenizer)."""
    needed = TASKS[task].token_ids
    return None if needed is None else needed(validate_options(task, options))


def build_dataset(task: str, options: dict | None, *, tokenizer, segment_size: int, num_segments: int,
                  num_samples: int, seed: int = 0) -> Dataset:
    """The dataset of ``task``; see the module docstring."""
    parsed = validate_options(task, options)
    for name, value in (("segment_size", segment_size), ("num_segments", num_segments), ("num_samples", num_samples)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if tokenizer is None and TASKS[task].needs_tokenizer:
        raise ValueError(f"task {task!r} needs a tokenizer (offline: rmt_peft.data.tokenizer.offline_tokenizer())")
    return TASKS[task].build(parsed, tokenizer=tokenizer, segment_size=segment_size, num_segments=num_segments,
                             num_samples=num_samples, seed=seed)


# datasets.load_dataset's builders: a ``path`` option naming one reads local files, not a Hub dataset
DATASET_BUILDERS = {"json", "csv", "text", "parquet", "arrow", "webdataset", "imagefolder", "audiofolder"}


def hub_datasets(options: dict) -> list[str]:
    """Hub datasets that ``data.options`` read (for a model card): noise / document presets and
    ``path`` options that are repo ids."""
    found = []

    def visit(value):
        if isinstance(value, str) and value in PRESETS:
            found.append(PRESETS[value][0])
        elif isinstance(value, dict):
            if value.get("source") in PRESETS:
                found.append(PRESETS[value["source"]][0])
            path = value.get("path")
            if isinstance(path, str) and path not in DATASET_BUILDERS and hub_repo_id(path):
                found.append(path)
            for inner in value.values():
                if isinstance(inner, dict):
                    visit(inner)
        return found

    visit(options)
    for value in options.values():
        visit(value)
    return sorted(set(found))
