"""Wall time and peak memory of one measured block (one length of a curve).

On CUDA the peak is ``torch.cuda.max_memory_allocated`` (reset at the start of the block): the
tensors the evaluation holds, weights included. On CPU torch has no allocator statistics, so a
background thread samples the process's resident set size every few milliseconds; its peak is
what the operating system saw, which is what "runs in constant memory" means on a CPU.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import psutil
import torch


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    memory_kind: str = ""  # "cuda_allocated" or "cpu_rss"


class measure:
    """``with measure(device) as m: ...`` fills ``m.seconds`` and ``m.peak_memory_bytes``."""

    def __init__(self, device: torch.device | str, interval_s: float = 0.005):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.result = Measurement()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample_rss(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.result.peak_memory_bytes = max(self.result.peak_memory_bytes, process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Measurement:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.result.memory_kind = "cuda_allocated"
        else:
            self.result.memory_kind = "cpu_rss"
            self._thread = threading.Thread(target=self._sample_rss, daemon=True)
            self._thread.start()
        self._start = time.perf_counter()
        return self.result

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result.peak_memory_bytes = int(torch.cuda.max_memory_allocated(self.device))
        self.result.seconds = time.perf_counter() - self._start
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.result.peak_memory_bytes = max(self.result.peak_memory_bytes, psutil.Process().memory_info().rss)
