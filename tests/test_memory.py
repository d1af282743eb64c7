import pytest
import torch

from rmt_peft import MemoryConfig, RMTModel
from rmt_peft.memory import perturb, relative_change
from rmt_peft.tiny_models import tiny_model


@pytest.mark.parametrize("field,value,message", [
    ("num_memory_tokens", -1, "num_memory_tokens=-1 is invalid: expected an integer >= 0"),
    ("segment_size", 0, "segment_size=0 is invalid: expected an integer >= 1"),
    ("bptt_depth", -2, "bptt_depth=-2 is invalid"),
    ("segment_alignment", "center", "segment_alignment='center' is invalid: expected one of ('left', 'right')"),
    ("loss_segments", 0, "loss_segments=0 is invalid"),
    ("memory_init_std", 0.0, "memory_init_std=0.0 is invalid"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ValueError) as err:
        MemoryConfig(**{field: value})
    assert message in str(err.value)


def test_round_trip_and_unknown_fields():
    cfg = MemoryConfig(num_memory_tokens=10, segment_size=2028, bptt_depth=3)
    assert MemoryConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.positions_per_segment == 2048
    with pytest.raises(ValueError, match=r"unknown MemoryConfig field\(s\) \['num_mem_tokens'\]"):
        MemoryConfig.from_dict({"num_mem_tokens": 3})


@pytest.mark.parametrize("field,value,message", [
    ("memory_update", "sum", "memory_update='sum' is invalid: expected one of ('replace', 'gated')"),
    ("memory_noise_std", -0.1, "memory_noise_std=-0.1 is invalid"),
    ("memory_gate_bias", float("nan"), "memory_gate_bias=nan is invalid"),
    ("memory_stability_power", 0, "memory_stability_power=0 is invalid: expected a number in (0, 1]"),
    ("memory_stability_power", 2.0, "memory_stability_power=2.0 is invalid"),
])
def test_bad_memory_update_values_name_the_field(field, value, message):
    with pytest.raises(ValueError) as err:
        MemoryConfig(**{field: value})
    assert message in str(err.value)


def _rmt(**memory):
    torch.manual_seed(0)
    return RMTModel.from_backbone(tiny_model("gpt_neo"), MemoryConfig(num_memory_tokens=3, segment_size=5, **memory),
                                  verbose=False)


IDS = torch.randint(2, 128, (2, 15), generator=torch.Generator().manual_seed(1))


def test_gated_update_is_a_convex_step_between_the_old_memory_and_the_write():
    replace, gated = _rmt(), _rmt(memory_update="gated")
    gated.memory.gate_weight.data.normal_(0, 0.1)  # a gate that depends on the write output
    with torch.no_grad():
        old = gated.initial_memory(2)
        written = replace(IDS[:, :5]).memory  # the same backbone and memory: what "replace" writes
        new = gated(IDS[:, :5]).memory
        gate = torch.sigmoid(written @ gated.memory.gate_weight + gated.memory.gate_bias)[..., None]
    torch.testing.assert_close(new, old + gate * (written - old), rtol=1e-5, atol=1e-6)


def test_closed_gate_keeps_the_memory_and_open_gate_replaces_it():
    with torch.no_grad():
        closed = _rmt(memory_update="gated", memory_gate_bias=-40.0)
        torch.testing.assert_close(closed(IDS).memory, closed.initial_memory(2))
        opened = _rmt(memory_update="gated", memory_gate_bias=40.0)
        torch.testing.assert_close(opened(IDS).memory, _rmt()(IDS).memory, rtol=1e-5, atol=1e-6)


def test_memory_noise_only_in_training_and_relative_to_the_memory_scale():
    noisy, plain = _rmt(memory_noise_std=0.5), _rmt()
    with torch.no_grad():
        torch.testing.assert_close(noisy.eval()(IDS).memory, plain.eval()(IDS).memory)
    # training (with gradients): the memory passed on is perturbed; dropout is 0 in tiny models
    torch.testing.assert_close(plain.train()(IDS).memory, plain.eval()(IDS).memory)
    assert not torch.allclose(noisy.train()(IDS).memory, plain.train()(IDS).memory)
    memory = torch.randn(64, 8, 256) * torch.logspace(-2, 2, 8)[None, :, None]
    ratio = (perturb(memory, 0.3) - memory).pow(2).mean(-1).sqrt() / memory.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(ratio.mean(0), torch.full((8,), 0.3), rtol=0.05, atol=0)


def _by_hand(rmt, ids, segment, shift=0.0):
    """Memories segment by segment through separate calls, the entering memory shifted by
    ``shift`` (a deterministic stand-in for the training noise); returns (clean memories, drift)."""
    memory, clean, changes = None, [], []
    for start in range(0, ids.shape[1], segment):
        entering = memory if memory is None or not shift else memory + shift
        memory = rmt(ids[:, start:start + segment], memory=entering, return_logits=False).memory
        if clean:
            old, new = clean[-1], memory
            changes.append(((new - old).pow(2).sum(-1) / old.pow(2).sum(-1)).mean())
        clean.append(memory)
    return clean, torch.stack(changes).mean()


def test_stability_loss_is_the_weighted_mean_relative_change_of_the_memory(monkeypatch):
    weight = 3.0
    plain, stable = _rmt(), _rmt(memory_stability_weight=weight)
    labels = IDS.clone()
    out = stable.train()(IDS, labels=labels)
    base = plain.train()(IDS, labels=labels)
    with torch.no_grad():
        _, drift = _by_hand(plain.eval(), IDS, 5)
    torch.testing.assert_close(out.memory_drift, drift, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.loss, base.loss + weight * drift, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: the task loss alone
        torch.testing.assert_close(stable.eval()(IDS, labels=labels).loss, plain.eval()(IDS, labels=labels).loss)


def test_stability_with_noise_compares_against_the_memory_before_its_noise(monkeypatch):
    import rmt_peft.recurrent as recurrent

    monkeypatch.setattr(recurrent, "perturb", lambda memory, std: memory + 0.5)
    rmt = _rmt(memory_stability_weight=1.0, memory_noise_std=0.1)
    out = rmt.train()(IDS, labels=IDS)
    with torch.no_grad():
        clean, drift = _by_hand(rmt.eval(), IDS, 5, shift=0.5)
    torch.testing.assert_close(out.memory, clean[-1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.memory_drift, drift, rtol=1e-4, atol=1e-7)


def test_stability_tolerance_saturates_the_penalty_of_large_writes():
    old = torch.ones(2, 3, 4)
    small, large = old * 1.01, old * 3.0  # relative squared change 1e-4 and 4 for every token
    torch.testing.assert_close(relative_change(old, small), torch.tensor(1e-4), rtol=1e-3, atol=0)
    torch.testing.assert_close(relative_change(old, small, 0.05), torch.tensor(1e-4 / (1e-4 + 0.05)), rtol=1e-3, atol=0)
    torch.testing.assert_close(relative_change(old, large, 0.05), torch.tensor(4 / 4.05), rtol=1e-4, atol=0)


def test_stability_power_one_half_penalises_the_relative_change_itself():
    old = torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]])   # norms 5 and 1
    new = old + torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]]])  # moved by 1 and by nothing
    # |new - old| / |old| = 1/5 and 0: the mean is 0.1 (the squared change would give 0.02)
    torch.testing.assert_close(relative_change(old, new, power=0.5), torch.tensor(0.1), rtol=1e-5, atol=0)
    torch.testing.assert_close(relative_change(old, new), torch.tensor(0.02), rtol=1e-5, atol=0)
    # an unchanged memory has a finite gradient (the slope of r ** 0.5 at 0 is infinite)
    moved = new.clone().requires_grad_()
    relative_change(old, moved, power=0.5).backward()
    assert torch.isfinite(moved.grad).all()
    # the model uses it: a sparse penalty of the same run equals the power-0.5 mean by hand
    plain, sparse = _rmt(), _rmt(memory_stability_weight=2.0, memory_stability_power=0.5)
    out, base = sparse.train()(IDS, labels=IDS), plain.train()(IDS, labels=IDS)
    with torch.no_grad():
        memories = []
        memory = None
        for start in range(0, IDS.shape[1], 5):
            memory = plain.eval()(IDS[:, start:start + 5], memory=memory, return_logits=False).memory
            memories.append(memory)
    by_hand = torch.stack([((b - a).pow(2).sum(-1) / a.pow(2).sum(-1)).sqrt().mean()
                           for a, b in zip(memories, memories[1:])]).mean()
    torch.testing.assert_close(out.memory_drift, by_hand, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.loss, base.loss + 2.0 * by_hand, rtol=1e-5, atol=1e-6)


def test_a_finished_padded_sample_gets_no_noise_and_no_stability_loss(monkeypatch):
    import rmt_peft.recurrent as recurrent

    monkeypatch.setattr(recurrent, "perturb", lambda memory, std: memory + 0.5)
    rmt = _rmt(memory_stability_weight=1.0, memory_noise_std=0.1).train()
    long, short = IDS[:1], IDS[1:, :10]  # 3 segments, and 2 segments padded on the right to 3
    ids = torch.cat([long, torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], 1)])
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    out = rmt(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    with torch.no_grad():
        long_memories, long_drift = _by_hand(rmt.eval(), long, 5, shift=0.5)
        short_memories, short_drift = _by_hand(rmt, short, 5, shift=0.5)
    torch.testing.assert_close(out.memory[1], short_memories[-1][0], rtol=1e-4, atol=1e-5)  # no noise after it ended
    # transitions 1 (both samples) and 2 (the short sample has ended: 0), averaged over the batch
    torch.testing.assert_close(out.memory_drift, (2 * long_drift + short_drift) / 4, rtol=1e-4, atol=1e-6)
