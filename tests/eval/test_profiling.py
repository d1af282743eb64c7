"""Wall time and peak memory of a measured block (rmt_peft/eval/profiling.py): on the CPU the peak
resident set a background thread saw, also of memory freed before the block ended; on CUDA the
allocator's peak."""
import time

import psutil
import pytest
import torch

from rmt_peft.eval.profiling import measure


def test_the_cpu_peak_includes_memory_freed_inside_the_block():
    size = 64 * 2**20
    before = psutil.Process().memory_info().rss
    with measure("cpu", interval_s=0.002) as m:
        start = time.perf_counter()
        block = b"\x01" * size  # written, so resident
        time.sleep(0.1)
        del block
        time.sleep(0.02)
        inside = time.perf_counter() - start
    assert m.memory_kind == "cpu_rss"
    assert m.peak_memory_bytes >= before + size * 0.9
    assert inside <= m.seconds < inside + 0.5


def test_the_cuda_peak_is_the_allocators(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: calls.append(("sync", str(device))))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(("reset", str(device))))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 12345)
    with measure("cuda:1") as m:
        assert calls == [("sync", "cuda:1"), ("reset", "cuda:1")]
    assert calls[-1] == ("sync", "cuda:1")
    assert (m.memory_kind, m.peak_memory_bytes) == ("cuda_allocated", 12345) and m.seconds == pytest.approx(0, abs=0.5)
