"""evaluate(): every curve writes metrics.json, CSVs and readable PNGs for a run and a baseline."""
import csv
import json
import os

import torch

from rmt_peft.data.token_memory import TokenMemoryTask
from rmt_peft.eval.runner import EvalSettings, curve_for_task, evaluate
from rmt_peft.memory import MemoryConfig
from rmt_peft.recurrent import RMTModel
from rmt_peft.tiny_models import tiny_model


def models():
    return {"rmt": RMTModel(tiny_model("gpt2", seed=1), MemoryConfig(num_memory_tokens=2, segment_size=8)),
            "baseline": RMTModel(tiny_model("gpt2", seed=1), MemoryConfig(num_memory_tokens=0, segment_size=8))}


def lm_builder(num_segments, num_samples):
    g = torch.Generator().manual_seed(num_segments)
    ids = [torch.randint(0, 128, (num_segments * 8,), generator=g) for _ in range(num_samples)]
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_curve_for_task():
    assert [curve_for_task(t) for t in ("token_memory", "babilong_detect", "arxiv_lm", "lean")] == \
        ["accuracy", "accuracy", "history", "perplexity"]


def test_accuracy_curve_files(tmp_path):
    built = []

    def build(n, k):
        built.append(n)
        return TokenMemoryTask(k, n, 8)

    metrics = evaluate(models(), build, EvalSettings("accuracy", [1, 2, 4], num_samples=3, progress=False), tmp_path)
    assert built == [1, 2, 4]  # one dataset per length, shared by both models
    assert set(metrics["results"]) == {"rmt", "baseline"}
    table = rows(tmp_path / "accuracy_vs_length.csv")
    assert [(r["model"], r["num_segments"]) for r in table] == [
        ("rmt", "1"), ("rmt", "2"), ("rmt", "4"), ("baseline", "1"), ("baseline", "2"), ("baseline", "4")]
    assert json.loads((tmp_path / "metrics.json").read_text())["results"]["rmt"][2]["num_tokens"] == 32
    for name in ("accuracy_vs_length.png", "time_vs_length.png", "memory_vs_length.png"):
        assert os.path.getsize(tmp_path / name) > 10_000


def test_history_and_perplexity_curves(tmp_path):
    metrics = evaluate(models(), lm_builder, EvalSettings("history", [1, 2, 3], num_samples=2, progress=False),
                       tmp_path / "h")
    assert metrics["results"]["rmt"]["history_sizes"] == [0, 1, 2]
    positions = rows(tmp_path / "h" / "loss_by_position.csv")
    assert len(positions) == 2 * 3 * 7  # models x histories x scored positions 1..S-1
    assert os.path.getsize(tmp_path / "h" / "perplexity_vs_history.png") > 10_000
    metrics = evaluate(models(), lm_builder, EvalSettings("perplexity", [1, 2], num_samples=2, progress=False),
                       tmp_path / "p")
    point = metrics["results"]["baseline"][1]
    assert point["perplexity_all"] > 1 and point["num_tokens"] == 16
    assert os.path.getsize(tmp_path / "p" / "perplexity_vs_length.png") > 10_000


def test_the_progress_bar_counts_segments_read(tmp_path, monkeypatch):
    """The bar's total and its updates are segments (a sample of 4 segments is 4 times the work of
    one), so its ETA is right; every curve fills it exactly."""
    import rmt_peft.eval.runner as runner

    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, k):
            self.n += k

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(runner, "tqdm", Bar)
    evaluate(models(), lambda n, k: TokenMemoryTask(k, n, 8), EvalSettings("accuracy", [1, 4], num_samples=3,
                                                                            batch_size=2), tmp_path / "a")
    evaluate(models(), lm_builder, EvalSettings("history", [1, 3], num_samples=2), tmp_path / "h")
    evaluate(models(), lm_builder, EvalSettings("perplexity", [2, 5], num_samples=2), tmp_path / "p")
    # models x samples x segments: (1 + 4) x 3; history sizes 0 and 2 read 1 and 3 segments; (2 + 5) x 2
    assert [(b.total, b.n) for b in bars] == [(2 * 3 * 5,) * 2, (2 * 2 * 4,) * 2, (2 * 2 * 7,) * 2]
