"""Segment checkpointing options that recompute less (MemoryConfig.uncheckpointed_segments,
checkpoint_policy="save_matmuls") and the dequantized-weight cache for 4-bit backbones: each
gives the loss and gradients of the plain run (CPU, tiny models)."""
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rmt_peft import MemoryConfig, RMTModel, load_backbone, recurrent
from rmt_peft.memory import activation_budget, segments_to_keep
from rmt_peft.speedups import cache_dequantized_weights
from rmt_peft.tiny_models import save_tiny_model, tiny_model

LORA = {"r": 4, "target_modules": "all-linear", "init_lora_weights": False}  # random B: LoRA gets gradients
PLAIN = MemoryConfig(num_memory_tokens=2, segment_size=16)


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return func(*args, **(kwargs or {}))


def loss_and_grads(model, ids):
    """Loss, gradients of every trainable parameter, blocks run in forward + backward, matmuls in backward."""
    model.zero_grad(set_to_none=True)
    block = model.causal_lm.transformer.h[0]
    calls = []
    hook = block.register_forward_hook(lambda *_: calls.append(1))
    loss = model(ids, labels=ids).loss
    with CountMatmuls() as matmuls:
        loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, len(calls), matmuls.count


@pytest.fixture(scope="module")
def runs():
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 64))  # 4 segments
    model = RMTModel.from_backbone(tiny_model("gpt_neo", num_layers=2), PLAIN, lora=LORA, verbose=False).train()
    out = {}
    for name, changes in {"plain": {}, "all": {"checkpoint_segments": True, "uncheckpointed_segments": 0},
                          "last kept": {"checkpoint_segments": True},
                          "two kept": {"checkpoint_segments": True, "uncheckpointed_segments": 2},
                          "save matmuls": {"checkpoint_segments": True, "uncheckpointed_segments": 0,
                                           "checkpoint_policy": "save_matmuls"},
                          "auto on the CPU": {"checkpoint_segments": "auto"}}.items():
        model.memory_config = dataclasses.replace(PLAIN, **changes)
        out[name] = loss_and_grads(model, ids)
    return out


@pytest.mark.parametrize("name", ["all", "last kept", "two kept", "save matmuls", "auto on the CPU"])
def test_checkpointing_options_give_the_plain_loss_and_gradients(runs, name):
    loss, grads = runs["plain"][:2]
    got_loss, got_grads = runs[name][:2]
    torch.testing.assert_close(got_loss, loss, rtol=1e-6, atol=1e-6)
    assert got_grads.keys() == grads.keys()
    for key in grads:
        torch.testing.assert_close(got_grads[key], grads[key], rtol=1e-5, atol=1e-6, msg=key)


def test_they_recompute_less(runs):
    # 4 segments: each checkpointed segment runs the block again in backward; kept ones do not
    assert [runs[n][2] for n in ("plain", "all", "last kept", "two kept")] == [4, 8, 7, 6]
    assert runs["auto on the CPU"][2] == 7  # no GPU memory to measure: "auto" acts as true
    # save_matmuls recomputes the segments, but their matmuls come from what was saved
    # (only the LM head's, and the backward's own, run): fewer than recompute_all
    plain, everything, selective = (runs[n][3] for n in ("plain", "all", "save matmuls"))
    assert runs["save matmuls"][2] == 8 and plain < selective < everything


def test_auto_keeps_the_segments_that_fit():
    """segments_to_keep by hand: as many as fit in the free memory less 10% (the kept ones are freed
    before any recompute, so none needs room beside them); never fewer than 1."""
    gib = 2 ** 30
    assert segments_to_keep(100 * gib, 9 * gib, 8) == 8  # 72 GiB <= 90
    assert segments_to_keep(50 * gib, int(8.9 * gib), 8) == 5  # 45 GiB usable: 5 segments' room
    assert segments_to_keep(29 * gib, int(7.3 * gib), 8) == 3  # the NF4 8 x 4 shape under a 32 GiB cap
    assert segments_to_keep(10 * gib, 9 * gib, 8) == 1  # one fits: the first, which measured
    assert segments_to_keep(5 * gib, 9 * gib, 8) == 1  # none fits: still the first
    assert segments_to_keep(10 * gib, 0, 8) == 8
    assert segments_to_keep(40 * gib, 9 * gib, 8, margin=0.0) == 4


@pytest.mark.parametrize("free, blocks", [(450, 4), (400, 5), (330, 6), (200, 7)])
def test_auto_on_a_gpu_checkpoints_what_does_not_fit(monkeypatch, free, blocks):
    """The "auto" step with a GPU's memory simulated: the first segment keeps its activations
    (100 bytes measured), segments_to_keep decides from the free memory less 10% (450: all 4 fit;
    400: 3 kept; 330: 2; 200: only the first), the rest are recomputed (4 block calls + one per
    recomputed segment); loss and gradients are the plain run's."""
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 64))  # 4 segments
    model = RMTModel.from_backbone(tiny_model("gpt_neo", num_layers=2), PLAIN, lora=LORA, verbose=False).train()
    loss, grads = loss_and_grads(model, ids)[:2]
    calls = []
    model.causal_lm.transformer.h[0].register_forward_hook(lambda *_: calls.append(1))
    monkeypatch.setattr(recurrent, "allocated_bytes", lambda device: 100 * len(calls))
    monkeypatch.setattr(recurrent, "free_gpu_bytes", lambda device: free)
    model.memory_config = dataclasses.replace(PLAIN, checkpoint_segments="auto", uncheckpointed_segments=0)
    got_loss, got_grads, got_blocks = loss_and_grads(model, ids)[:3]
    assert got_blocks == blocks
    torch.testing.assert_close(got_loss, loss, rtol=1e-6, atol=1e-6)
    for key in grads:
        torch.testing.assert_close(got_grads[key], grads[key], rtol=1e-5, atol=1e-6, msg=key)


def test_auto_budget_by_hand():
    """activation_budget: 0.8 of the budget at which every segment's bytes (measured at budget 1)
    would just fit in the free memory less 10%, within [0.1, 1]."""
    gib = 2 ** 30
    # the NF4 8 x 4 shape under a 32 GiB cap: 0.8 x 26.1 / 58.4 = 0.357 (0.35 measured 0.88x on an H100)
    assert activation_budget(29 * gib, int(7.3 * gib), 8) == pytest.approx(0.8 * 0.9 * 29 / (8 * 7.3), rel=1e-6)
    assert activation_budget(100 * gib, 9 * gib, 8) == 1.0  # everything fits
    assert activation_budget(5 * gib, 9 * gib, 8) == 0.1  # the floor
    assert activation_budget(10 * gib, 0, 8) == 1.0


@pytest.mark.parametrize("chosen", [None, 0.5])
def test_auto_lowers_the_budget_of_the_graphs_it_compiled(monkeypatch, caplog, chosen):
    """from_backbone(compile=True) with "auto" and a GPU's memory simulated (a segment holds 100
    bytes x the graphs' budget, 200 free): at 4 segments 1 fits, so the next forward compiles the
    blocks again at activation_budget's 0.8 x 180 / 400 = 0.36, says so, and then all 4 fit
    (36 bytes each): no further compile. 8 segments (a curriculum's next stage) fit 5 at 0.36, so
    it lowers again, relative to what it measured: 0.36 x 0.8 x 180 / 288 = 0.18. A budget the user
    chose (compile_memory_budget=0.5) is kept. Loss and gradients stay the plain run's."""
    from rmt_peft.speedups import compile_blocks

    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 64))  # 4 segments
    model = RMTModel.from_backbone(tiny_model("gpt_neo", num_layers=2), PLAIN, lora=LORA, verbose=False,
                                   compile=True, compile_memory_budget=chosen).train()
    compile_blocks(model.causal_lm, backend="eager")  # dynamo without inductor: the test is the decision
    loss, grads = loss_and_grads(model, ids)[:2]
    calls, budget = [], [1.0 if chosen is None else chosen]
    model.causal_lm.transformer.h[0].register_forward_hook(lambda *_: calls.append(budget[0]))
    monkeypatch.setattr(recurrent, "allocated_bytes", lambda device: 100 * sum(calls))
    monkeypatch.setattr(recurrent, "free_gpu_bytes", lambda device: 200)
    monkeypatch.setattr(recurrent, "compile_model", lambda model, compile, scope, b: budget.__setitem__(0, b))
    model.memory_config = dataclasses.replace(PLAIN, checkpoint_segments="auto")
    with caplog.at_level("INFO", logger="rmt_peft"):
        for _ in range(3):
            got_loss, got_grads = loss_and_grads(model, ids)[:2]
        assert budget[0] == pytest.approx(0.36 if chosen is None else 0.5)
        loss_and_grads(model, torch.randint(0, 128, (2, 128)))  # 8 segments
        loss_and_grads(model, torch.randint(0, 128, (2, 128)))
    if chosen is None:
        assert budget[0] == pytest.approx(0.18)
        assert caplog.text.count("of their activations") == 2 and "keep 0.36 of their activations" in caplog.text
    else:
        assert budget[0] == 0.5 and "of their activations" not in caplog.text
    torch.testing.assert_close(got_loss, loss, rtol=1e-6, atol=1e-6)
    for key in grads:
        torch.testing.assert_close(got_grads[key], grads[key], rtol=1e-5, atol=1e-6, msg=key)
    compile_blocks(model.causal_lm, enable=False)  # a compile the user undid is left undone
    loss_and_grads(model, torch.randint(0, 128, (2, 256)))  # 16 segments
    assert budget[0] == pytest.approx(0.18 if chosen is None else 0.5)
    torch._dynamo.reset()


def test_bad_option_values_are_named():
    with pytest.raises(ValueError, match="checkpoint_segments='yes'.*'auto'"):
        MemoryConfig(checkpoint_segments="yes")
    with pytest.raises(ValueError, match="checkpoint_policy='save_all'.*recompute_all"):
        MemoryConfig(checkpoint_policy="save_all")
    with pytest.raises(ValueError, match="uncheckpointed_segments=-1"):
        MemoryConfig(uncheckpointed_segments=-1)


def test_dequantized_weight_cache_gives_the_4bit_loss_and_gradients(tmp_path):
    """The cache multiplies with bitsandbytes' own dequantized weights: same loss and gradients
    as the 4-bit layers, also through segment checkpointing; enable=False restores the layers."""
    path = save_tiny_model(str(tmp_path / "neo"), "gpt_neo", num_layers=2)
    config = dataclasses.replace(PLAIN, checkpoint_segments=True, uncheckpointed_segments=0)
    torch.manual_seed(0)
    backbone = load_backbone(path, quantization="4bit", dtype="float32", quantization_backend="bitsandbytes")
    model = RMTModel.from_backbone(backbone, config, lora=LORA, verbose=False, cache_dequantized=False).train()
    ids = torch.randint(0, 128, (2, 48), device=next(model.parameters()).device)
    loss, grads = loss_and_grads(model, ids)[:2]
    layers = cache_dequantized_weights(model)
    assert layers == 12  # 6 linear layers x 2 blocks (the head stays unquantized)
    cached = [m for m in model.modules() if hasattr(m, "dequantized_weight")]
    assert len(cached) == 12 and all(m.dequantized_weight.dtype == torch.float32 for m in cached)
    got_loss, got_grads = loss_and_grads(model, ids)[:2]
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-6)
    for key in grads:
        torch.testing.assert_close(got_grads[key], grads[key], rtol=1e-4, atol=1e-6, msg=key)
    assert cache_dequantized_weights(model, enable=False) == 12
    assert not any("dequantized_weight" in vars(m) or "forward" in vars(m) for m in model.modules())


def test_cache_is_on_by_default_only_where_it_costs_little(tmp_path, monkeypatch):
    """from_backbone's default: the copies' size is 2 bytes (bf16) per weight of the 4-bit layers,
    counted here from the unquantized model; on the CPU the default leaves the layers alone,
    cache_dequantized=True caches; on a GPU the cache is on up to a tenth of its memory."""
    from types import SimpleNamespace

    from rmt_peft import speedups

    path = save_tiny_model(str(tmp_path / "neo"), "gpt_neo", num_layers=2)
    plain = load_backbone(path)
    expected = 2 * sum(m.weight.numel() for name, m in plain.named_modules()
                       if isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    quantized = load_backbone(path, quantization="4bit", quantization_backend="bitsandbytes")  # compute dtype bf16
    assert speedups.dequantized_cache_bytes(quantized)[0] == expected
    on_gpu = speedups.dequantized_cache_bytes(quantized)[1].type == "cuda"  # bitsandbytes' choice where there is one
    if not on_gpu:
        assert speedups.cache_pays(quantized) == (False, "4-bit weights on cpu, not a CUDA GPU")

    model = RMTModel.from_backbone(quantized, PLAIN, lora=LORA, verbose=False)
    assert any(hasattr(m, "dequantized_weight") for m in model.modules()) == on_gpu
    model = RMTModel.from_backbone(load_backbone(path, quantization="4bit", quantization_backend="bitsandbytes"), PLAIN,
                                   lora=LORA, verbose=False, cache_dequantized=True)
    assert sum(hasattr(m, "dequantized_weight") for m in model.modules()) == 12

    monkeypatch.setattr(speedups, "dequantized_cache_bytes", lambda m: (expected, torch.device("cuda", 0)))
    for gpu_bytes, on in ((10 * expected, True), (10 * expected - 1, False)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, b=gpu_bytes: SimpleNamespace(total_memory=b))
        decision, why = speedups.cache_pays(quantized)
        assert decision is on and why.startswith("on" if on else "off")
