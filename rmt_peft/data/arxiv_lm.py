"""Language modelling with history (the paper's Figs. 7-8): a target segment after H history segments.

Documents (ArXiv from The Pile in the paper; any text source of noise.py) are tokenized and cut
into non-overlapping segments of ``segment_size`` tokens (a trailing partial segment is dropped).
A sample is ``H + 1`` consecutive segments of one document; labels are the target (last) segment
only, so the loss and perplexity measure how well the history, carried by memory, predicts it.

``num_segments`` is ``H + 1``. ``history_sizes`` mixes H within a batch schedule: each sample
draws its H from the list (deterministically by index); samples then differ in length and
``collate(..., padding_side="left")`` keeps every target in the last segment. Every sample's target
has at least ``max(history_sizes)`` segments before it in its document, so the same targets can be
scored with any history size. Per-position loss inside the target (Fig. 8) needs nothing more: the
target is the last ``segment_size`` labels.

``history_tokens`` builds the paper's plain-context baselines instead (GPT-2 with 0 / 128 / 768
tokens of history, no memory): a sample is one segment, the ``history_tokens`` tokens before a
target of ``segment_size - history_tokens`` tokens, labelled on the target only; documents are cut
on the target grid, so with target 124 and history 768 the targets are those of a memory model
with 124-token segments.

The generated source's documents also depend on the dataset ``seed``, so a train and an eval set
built with different seeds share no document (for real data, pick the split in ``documents``).
Documents are read lazily, only until ``num_samples`` targets are found (a streaming Hub dataset is
never read to the end). Empty documents and documents shorter than ``H + 1`` segments are counted
skips; when the source runs out first, targets are reused with a warning.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..inputs import IGNORE_INDEX
from .noise import TextSourceOptions, encode, pieces, text_source
from .skips import SkipCounter
logger = logging.getLogger("rmt_peft.data")


@dataclass
class ArxivLMOptions:
    """``documents``: a text source (noise.py: "generated", "arxiv", "pg19", or a dict).
    ``history_sizes``: the H values to mix (each in 0 .. num_segments - 1); None: H = num_segments - 1.
    ``max_documents``: stop reading after this many documents (None: as many as needed).
    ``history_tokens``: plain-context samples (one segment: this many history tokens + the target);
    None: history in segments, read through memory."""

    documents: str | dict = "generated"
    history_sizes: list[int] | None = None
    max_documents: int | None = None
    history_tokens: int | None = None

    def __post_init__(self):
        self.document_source = TextSourceOptions.parse(self.documents, "documents")
        if self.history_sizes is not None:
            if (not isinstance(self.history_sizes, (list, tuple)) or not self.history_sizes
                    or not all(isinstance(h, int) and h >= 0 for h in self.history_sizes)):
                raise ValueError(f"history_sizes={self.history_sizes!r} must be a non-empty list of integers >= 0")
            self.history_sizes = list(self.history_sizes)
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"max_documents={self.max_documents} must be >= 1 or None")
        if self.history_tokens is not None:
            if not isinstance(self.history_tokens, int) or self.history_tokens < 0:
                raise ValueError(f"history_tokens={self.history_tokens!r} must be an integer >= 0 or None")
            if self.history_sizes is not None:
                raise ValueError("history_tokens (plain context) and history_sizes (history in segments) "
                                 "exclude each other; set one")


class HistoryLMDataset(Dataset):
    """Samples of a target segment preceded by its H history segments; item ``i`` is deterministic."""

    def __init__(self, options: ArxivLMOptions, *, tokenizer, segment_size: int, num_segments: int,
                 num_samples: int, seed: int = 0):
        if tokenizer is None:
            raise ValueError("arxiv_lm needs a tokenizer (for offline use: rmt_peft.data.tokenizer.offline_tokenizer())")
        if segment_size < 1 or num_segments < 1 or num_samples < 1:
            raise ValueError(f"segment_size={segment_size}, num_segments={num_segments} and "
                             f"num_samples={num_samples} must all be >= 1")
        sizes = options.history_sizes or [num_segments - 1]
        if max(sizes) > num_segments - 1:
            raise ValueError(f"history_sizes={sizes} allow at most num_segments - 1 = {num_segments - 1}")
        self.history_tokens = options.history_tokens
        if self.history_tokens is not None:
            if num_segments != 1 or segment_size - self.history_tokens < 2:
                raise ValueError(f"history_tokens={self.history_tokens} puts history and target in one segment: "
                                 f"needs num_segments=1 (got {num_segments}) and segment_size >= history_tokens + 2 "
                                 f"(got {segment_size})")
            segment_size -= self.history_tokens  # the target; documents are cut on its grid
            sizes = [-(-self.history_tokens // segment_size)]  # whole targets before the first one
        self.history_sizes, self.segment_size, self.num_samples, self.seed = sizes, segment_size, num_samples, seed
        self.max_history = max(sizes)
        self.documents: list[torch.Tensor] = []       # token ids, cut to whole segments
        self.targets: list[tuple[int, int]] = []      # (document, target segment index)
        self.skips = SkipCounter(f"arxiv_lm documents from {options.document_source.source}")
        source = options.document_source
        if source.source == "generated":
            # Different dataset seeds (train / eval) must not share generated documents.
            source = dataclasses.replace(source, seed=source.seed * 1_000_003 + seed)
        self._read(text_source(source), tokenizer, options.max_documents)
        self.order = list(range(len(self.targets)))
        random.Random(f"arxiv_lm/{seed}/order").shuffle(self.order)

    def _read(self, source, tokenizer, max_documents: int | None) -> None:
        needed = self.max_history + 1
        for number, text in enumerate(source.iter_documents()):
            if len(self.targets) >= self.num_samples or (max_documents is not None and number >= max_documents):
                break
            ids = [i for piece in pieces(text) for i in encode(tokenizer, piece)]
            segments = len(ids) // self.segment_size
            if not ids:
                self.skips.skip("empty document", f"document {number}")
            elif segments < needed:
                self.skips.skip(f"shorter than max(history) + 1 = {needed} segments of {self.segment_size} tokens",
                                f"document {number}: {len(ids)} tokens")
            else:
                doc = len(self.documents)
                self.documents.append(torch.tensor(ids[:segments * self.segment_size], dtype=torch.int32))
                self.targets.extend((doc, t) for t in range(self.max_history, segments))
        if not self.targets:
            raise ValueError(f"no document has {needed} segments of {self.segment_size} tokens; "
                             f"{self.skips.summary()}; {source.skips.summary()}")
        self.targets = self.targets[:self.num_samples]
        if self.skips.total:
            logger.warning("%s; kept %d documents", self.skips.summary(), len(self.documents))
        if len(self.targets) < self.num_samples:
            logger.warning("arxiv_lm: the source has only %d target segments for %d samples: targets are reused",
                           len(self.targets), self.num_samples)

    def history_size(self, index: int) -> int:
        """H of sample ``index``."""
        return random.Random(f"arxiv_lm/{self.seed}/{index}/history").choice(self.history_sizes)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        doc, target = self.targets[self.order[index % len(self.order)]]
        end = (target + 1) * self.segment_size
        if self.history_tokens is not None:
            context = self.history_tokens
        else:
            context = self.history_size(index) * self.segment_size
        input_ids = self.documents[doc][end - self.segment_size - context:end].long()
        labels = input_ids.clone()
        labels[:context] = IGNORE_INDEX
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
