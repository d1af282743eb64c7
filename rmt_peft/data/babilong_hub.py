"""BABILong from the Hugging Face Hub (``babilong_hub``): the public benchmark as a data source.

The public set (``RMT-team/babilong``; training samples in ``RMT-team/babilong-train-5k-samples``)
has one config per length (``0k``, ``1k``, ``2k``, ``4k``, ..., ``128k`` and more: bAbI facts
hidden in PG-19 text of about that many tokens) and one split per bAbI task (``qa1`` .. ``qa20``),
with the columns ``input`` (facts in background text), ``question`` and ``target`` (the answer).
A sample here is ``[input][question][answer]`` tokenized with the model's tokenizer (question and
answer after a space, as the generated BABILong tasks write them); labels cover the answer
(``loss_on="answer"``) or every token (``"all"``), and ``answer_ids`` lets evaluation score exact match.

``length: auto`` picks, for each number of segments, the largest config of ``lengths`` whose
nominal size (``Nk`` = N x 1024 tokens) fits ``num_segments x segment_size``; a sample that is
longer after tokenization is a counted skip. Sample lengths follow the Hub data, so a stage's
``num_segments`` is an upper bound (batches are padded). The split is read with ``datasets``
(streaming by default) only until ``num_samples`` samples fit; with fewer, samples are reused with
a warning. A local folder laid out like the Hub repo (``data/qa1/4k.json`` ... and a README whose
``configs`` name them) serves offline; ``load_kwargs`` passes more ``load_dataset`` arguments
(``{revision: ...}``).
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from ..inputs import IGNORE_INDEX
from .noise import encode
from .skips import SkipCounter
LOSS_ON = ("answer", "all")
HUB_LENGTHS = ["0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k"]
COLUMNS = ("input", "question", "target")
logger = logging.getLogger("rmt_peft.data")


def nominal_tokens(length: str) -> int:
    """Tokens a length config stands for: "0k" -> 0, "4k" -> 4096, "1M" -> 1048576."""
    match = re.fullmatch(r"(\d+)([kKM])", length)
    if not match:
        raise ValueError(f"length {length!r} is not a BABILong length config such as '0k', '4k', '128k', '1M'")
    return int(match.group(1)) * (1024 if match.group(2) in "kK" else 1024 ** 2)


@dataclass
class BabilongHubOptions:
    """``path``: a Hub dataset or a local folder with its layout. ``task``: the split (qa1 .. qa20).
    ``length``: a config, or "auto" (the largest of ``lengths`` that fits the segments).
    ``loss_on``: "answer" or "all". ``streaming`` and ``load_kwargs``: passed to ``load_dataset``."""

    path: str = "RMT-team/babilong"
    task: str = "qa1"
    length: str = "auto"
    lengths: list[str] = field(default_factory=lambda: list(HUB_LENGTHS))
    loss_on: str = "answer"
    streaming: bool = True
    load_kwargs: dict | None = None

    def __post_init__(self):
        if not re.fullmatch(r"qa([1-9]|1[0-9]|20)", str(self.task)):
            raise ValueError(f"task={self.task!r} is not a bAbI task split; allowed: qa1 .. qa20")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={self.loss_on!r} is not allowed; allowed: {LOSS_ON}")
        if not isinstance(self.lengths, list) or not self.lengths:
            raise ValueError(f"lengths={self.lengths!r} must be a non-empty list of length configs")
        for length in self.lengths + ([] if self.length == "auto" else [self.length]):
            nominal_tokens(length)
        if self.load_kwargs is not None and not isinstance(self.load_kwargs, dict):
            raise ValueError(f"load_kwargs={self.load_kwargs!r} must be a dict of load_dataset arguments")

    def config_for(self, max_tokens: int) -> str:
        """The length config to read for samples of at most ``max_tokens`` tokens."""
        if self.length != "auto":
            return self.length
        fitting = [length for length in self.lengths if nominal_tokens(length) <= max_tokens]
        if not fitting:
            raise ValueError(f"no BABILong length of {self.lengths} fits {max_tokens} tokens")
        return max(fitting, key=nominal_tokens)


class BabilongHubDataset(Dataset):
    """Samples of one BABILong task at one length config; item ``i`` is deterministic in ``seed``."""

    def __init__(self, options: BabilongHubOptions, *, tokenizer, segment_size: int, num_segments: int,
                 num_samples: int, seed: int = 0):
        if tokenizer is None:
            raise ValueError("babilong_hub needs a tokenizer "
                             "(for offline use: rmt_peft.data.tokenizer.offline_tokenizer())")
        self.options, self.num_samples = options, num_samples
        self.max_length = num_segments * segment_size
        self.config = options.config_for(self.max_length)
        self.name = f"{options.path} {self.config}/{options.task}"
        self.skips = SkipCounter(f"babilong_hub {self.name}")
        self.samples: list[tuple[torch.Tensor, torch.Tensor]] = []  # (prompt ids, answer ids), int32
        for number, row in enumerate(self._rows()):
            if len(self.samples) >= num_samples:
                break
            if not all(isinstance(row.get(c), str) for c in COLUMNS):
                self.skips.skip(f"row without string columns {COLUMNS}", f"row {number}")
                continue
            prompt = encode(tokenizer, row["input"]) + encode(tokenizer, " " + row["question"])
            answer = encode(tokenizer, " " + row["target"])
            if len(prompt) + len(answer) > self.max_length:
                self.skips.skip(f"longer than {num_segments} segments of {segment_size} tokens",
                                f"row {number}: {len(prompt) + len(answer)} tokens")
                continue
            self.samples.append((torch.tensor(prompt, dtype=torch.int32), torch.tensor(answer, dtype=torch.int32)))
        if not self.samples:
            raise ValueError(f"{self.name}: no sample fits {num_segments} segments of {segment_size} tokens "
                             f"({self.skips.summary()}); use more segments or a shorter length")
        if self.skips.total:
            logger.warning("%s; kept %d samples", self.skips.summary(), len(self.samples))
        if len(self.samples) < num_samples:
            logger.warning("babilong_hub %s: %d samples for %d: samples are reused", self.name, len(self.samples),
                           num_samples)
        self.order = list(range(len(self.samples)))
        random.Random(f"babilong_hub/{seed}/order").shuffle(self.order)

    def _rows(self):
        import datasets

        o = self.options
        return datasets.load_dataset(o.path, self.config, split=o.task, streaming=o.streaming, **(o.load_kwargs or {}))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        prompt, answer = self.samples[self.order[index % len(self.order)]]
        input_ids = torch.cat([prompt, answer]).long()
        labels = input_ids.clone()
        if self.options.loss_on == "answer":
            labels[:len(prompt)] = IGNORE_INDEX
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
                "answer_ids": answer.long()}
