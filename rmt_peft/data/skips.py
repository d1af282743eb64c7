"""Counted, reported skips of bad input (empty documents, undecodable bytes, malformed lines, ...).

Data builders never crash mid-epoch on one bad record and never drop it silently either: each
skip is counted by reason and logged as a warning when its count reaches 1, 2, 4, 8, ... (so a
corpus with a million empty lines logs twenty lines, not a million). ``summary()`` gives the
totals for error messages when nothing usable is left.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator

logger = logging.getLogger("rmt_peft.data")


class SkipCounter:
    """Counts skipped records per reason for one input (``what`` names it in the messages)."""

    def __init__(self, what: str):
        self.what = what
        self.counts: Counter[str] = Counter()

    def skip(self, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        count = self.counts[reason]
        if count & (count - 1) == 0:  # a power of two: log 1, 2, 4, 8, ...
            logger.warning("%s: skipped %d record(s) so far: %s%s", self.what, count, reason,
                           f" (latest: {detail})" if detail else "")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return f"{self.what}: nothing skipped"
        return f"{self.what}: skipped " + ", ".join(f"{n} ({reason})" for reason, n in self.counts.most_common())


def json_lines(path: str, what: str, skips: SkipCounter) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each line of a JSONL file; bad lines are counted skips."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                skips.skip(f"{what} line is not valid UTF-8", f"line {number}, byte {error.start}")
                continue
            except json.JSONDecodeError as error:
                skips.skip(f"{what} line is not JSON", f"line {number}: {error.msg}")
                continue
            if not isinstance(record, dict):
                skips.skip(f"{what} line is not a JSON object", f"line {number}")
                continue
            yield number, record
