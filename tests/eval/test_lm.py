"""LM curves through the streaming path equal direct rmt(...) forward computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from rmt_peft.eval.lm import history_curve, length_perplexity
from rmt_peft.memory import MemoryConfig
from rmt_peft.recurrent import RMTModel
from rmt_peft.tiny_models import tiny_model

S = 8


def make_rmt(memory=4):
    rmt = RMTModel(tiny_model("llama", seed=3), MemoryConfig(num_memory_tokens=memory, segment_size=S,
                                                              memory_init_std=0.5))
    torch.manual_seed(4)
    with torch.no_grad():
        rmt.read_embedding.normal_(0, 0.3)
        rmt.write_embedding.normal_(0, 0.3)
    return rmt.eval()


def documents(count, segments):
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(0, 128, (segments * S,), generator=g)} for _ in range(count)]


@torch.no_grad()
def test_history_curve_matches_direct_forward_on_each_window():
    rmt, samples = make_rmt(), documents(3, 4)
    curve = history_curve(rmt, samples, [0, 1, 3], num_samples=3, progress=False)
    for h in (0, 1, 3):
        per_position = []
        for s in samples:
            window = s["input_ids"][(3 - h) * S:][None]
            logits = rmt(window).logits[0, -S:]
            target = window[0, -S:]
            per_position.append(F.cross_entropy(logits[:-1], target[1:], reduction="none"))
        expected = torch.stack(per_position).mean(0)
        assert curve.position_loss[h] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)
        assert curve.perplexity[h] == pytest.approx(math.exp(expected.mean()), rel=1e-4)
    assert curve.perplexity[3] != pytest.approx(curve.perplexity[0], rel=1e-6)  # memory carries history


def test_no_memory_baseline_is_flat_in_history():
    curve = history_curve(make_rmt(memory=0), documents(2, 3), [0, 2], num_samples=2, progress=False)
    assert curve.position_loss[0] == pytest.approx(curve.position_loss[2], rel=1e-5)


@torch.no_grad()
def test_length_perplexity_matches_direct_forward():
    rmt = make_rmt()
    data = {n: documents(2, n) for n in (1, 3)}
    for n, samples in data.items():  # mask a few labels, like a task that scores only some tokens
        for s in samples:
            s["labels"] = s["input_ids"].clone()
            s["labels"][2:5] = -100
    points = length_perplexity(rmt, lambda n, k: data[n][:k], [1, 3], num_samples=2, chunk_size=5, progress=False)
    for point, n in zip(points, (1, 3)):
        ids = torch.stack([s["input_ids"] for s in data[n]])
        labels = torch.stack([s["labels"] for s in data[n]])
        out = rmt(ids, labels=labels)
        assert point.loss_all == pytest.approx(float(out.loss), rel=1e-4)
        assert point.perplexity_last_segment == pytest.approx(math.exp(out.segment_losses[-1]), rel=1e-4)
        assert point.num_tokens == n * S
