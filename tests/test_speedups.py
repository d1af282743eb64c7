"""The speed-ups keep the model's function (CPU, tiny models)."""
import copy

import pytest
import torch
from transformers.activations import NewGELUActivation

from rmt_peft.speedups import FusedTanhGelu, compile_blocks, compile_body, compiled_scope, speed_up, use_fused_gelu
from rmt_peft.tiny_models import tiny_model


def test_fused_gelu_is_gelu_new():
    x = torch.randn(4096, dtype=torch.float64) * 4
    assert torch.allclose(FusedTanhGelu()(x), NewGELUActivation()(x), atol=1e-12)


def test_fused_gelu_swap_keeps_outputs_and_restores():
    model = tiny_model("gpt_neo", num_layers=2)
    fast = copy.deepcopy(model)
    assert use_fused_gelu(fast) == 2 and use_fused_gelu(fast) == 0
    ids = torch.randint(0, 128, (2, 40))
    assert torch.allclose(fast(ids).logits, model(ids).logits, atol=1e-5)
    assert use_fused_gelu(fast, enable=False) == 2
    assert all(type(b.mlp.act) is NewGELUActivation for b in fast.transformer.h)


def test_speed_up_and_compiled_blocks_keep_outputs():
    model = tiny_model("gpt_neo", num_layers=2)
    fast = copy.deepcopy(model)
    assert speed_up(fast) == {"gpt_neo_sdpa": 2, "fused_gelu": 2}
    assert compile_blocks(fast, backend="eager") == 2  # the wiring, without inductor's compile time
    ids = torch.randint(0, 128, (1, 50))
    assert torch.allclose(fast(ids).logits, model(ids).logits, atol=1e-4)
    assert compile_blocks(fast, enable=False) == 2
    assert all(b._compiled_call_impl is None for b in fast.transformer.h)


def test_cuda_graph_blocks_step_aside_without_gradients():
    """No compilation happens for calls under no_grad (CPU: nothing compiles at all then)."""
    from torch._dynamo.utils import counters

    model = tiny_model("gpt_neo", num_layers=2)
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        expected = model(ids).logits
        assert compile_blocks(model, mode="reduce-overhead") == 2
        frames = counters["frames"]["total"]
        torch.testing.assert_close(model(ids).logits, expected)
    assert counters["frames"]["total"] == frames
    assert all(b._compiled_call_impl is not None for b in model.transformer.h)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_gpu_cuda_graph_blocks_train_like_eager():
    """compile_blocks(mode="reduce-overhead") replays CUDA graphs across segments and steps; the
    losses and gradients of BPTT must stay those of the eager model. (With checkpoint_segments
    torch fails to record the graphs, an error; recipes reject that combination.) Calls without
    gradients run eagerly: graph trees would overwrite block outputs still in use."""
    from rmt_peft import MemoryConfig, RMTModel, stream_tokens

    torch.manual_seed(0)
    config = MemoryConfig(num_memory_tokens=2, segment_size=16)
    eager = RMTModel(tiny_model("gpt_neo", num_layers=2).cuda(), config).train()
    graphs = copy.deepcopy(eager)
    speed_up(eager)
    speed_up(graphs)
    compile_blocks(graphs, mode="reduce-overhead")
    for step in range(3):  # the first calls record, later ones replay
        ids = torch.randint(0, 128, (2, 48), device="cuda")
        losses, grads = [], []
        for model in (eager, graphs):
            model.zero_grad(set_to_none=True)
            loss = model(ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.memory.parameters()]))
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)
    # Without gradients (evaluation, streaming) the graphs step aside instead of failing.
    eager.eval()
    graphs.eval()
    with torch.no_grad():
        ids = torch.randint(0, 128, (2, 48), device="cuda")
        torch.testing.assert_close(graphs(ids).logits, eager(ids).logits, rtol=1e-4, atol=1e-4)
        long_ids = torch.randint(0, 128, (1, 160), device="cuda")
        streamed = stream_tokens(graphs, long_ids.split(50, dim=1)).memory
        torch.testing.assert_close(streamed, eager.read(long_ids), rtol=1e-4, atol=1e-4)


def test_exact_speedups_are_on_by_default_and_keep_outputs(tmp_path):
    """load_backbone and RMTModel.from_backbone apply SDPA (GPT-Neo) and the fused GELU without a
    line of code; speedups=False gives transformers' own model, and both compute the same loss,
    gradients and logits (also through LoRA, and after merging it)."""
    from transformers.activations import NewGELUActivation

    from rmt_peft import MemoryConfig, RMTModel, load_backbone
    from rmt_peft.attention import GPTNeoSdpaSelfAttention
    from rmt_peft.tiny_models import save_tiny_model

    path = save_tiny_model(str(tmp_path / "neo"), "gpt_neo", num_layers=2)
    kinds = (FusedTanhGelu, NewGELUActivation, GPTNeoSdpaSelfAttention)

    def count(model):
        return [sum(type(m) is kind for m in model.modules()) for kind in kinds]

    fast, plain = load_backbone(path), load_backbone(path, speedups=False)
    assert count(fast) == [2, 0, 2] and count(plain) == [0, 2, 0]
    assert count(load_backbone(path, attn_implementation="eager")) == [2, 0, 0]  # named: kept

    config = MemoryConfig(num_memory_tokens=2, segment_size=16)
    lora = {"r": 4, "target_modules": "all-linear", "init_lora_weights": False}  # random B: LoRA acts
    models = []
    for backbone, speedups in ((plain, True), (load_backbone(path, speedups=False), False)):
        torch.manual_seed(0)
        models.append(RMTModel.from_backbone(backbone, config, lora=lora, verbose=False, speedups=speedups).train())
    (on, off), ids = models, torch.randint(0, 128, (2, 40))
    assert count(on) == [2, 0, 2] and on.pad_lm_head and count(off) == [0, 2, 0] and not off.pad_lm_head
    grads = []
    for model in models:
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
        model.eval()
    # fp32 rounding only (SDPA sums in another order): relative to the gradient's size
    assert (grads[0] - grads[1]).norm() < 1e-4 * grads[1].norm()
    with torch.no_grad():
        torch.testing.assert_close(on(ids).logits, off(ids).logits, rtol=1e-4, atol=1e-5)
        merged = on.merge_and_unload(dtype=torch.float32)
        torch.testing.assert_close(merged(ids).logits, off(ids).logits, rtol=1e-4, atol=1e-4)


def test_compile_is_one_argument_away(monkeypatch):
    """from_backbone(compile=...) reaches compile_blocks with the mode asked for."""
    import rmt_peft.speedups
    from rmt_peft import MemoryConfig, RMTModel

    calls = []
    monkeypatch.setattr(rmt_peft.speedups, "compile_blocks", lambda model, **kwargs: calls.append(kwargs))
    for compile in (False, True, "reduce-overhead"):
        RMTModel.from_backbone(tiny_model("gpt_neo"), MemoryConfig(2, 16), verbose=False, compile=compile)
    assert calls == [{}, {"mode": "reduce-overhead"}]


def test_compile_body_is_one_compiled_call_a_segment_and_trains_like_eager():
    """compile_body: the decoder stack is one graph for every segment (no block compiled on its
    own, no graph break), the loss and the trainable gradients are the eager model's to the last
    bit; compile_blocks takes over from it (they never nest) and enable=False undoes both."""
    from torch._dynamo.utils import counters

    from rmt_peft import MemoryConfig, RMTModel
    from rmt_peft.speedups import blocks_compiled

    def build():
        torch.manual_seed(0)
        return RMTModel.from_backbone(tiny_model("gpt_neo", num_layers=3), MemoryConfig(2, 16), lora="all-linear",
                                      verbose=False)

    ids = torch.randint(0, 128, (2, 3 * 16))

    def loss_and_grads(rmt):
        rmt.zero_grad()
        loss = rmt(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in rmt.parameters() if p.requires_grad]

    eager = loss_and_grads(build())
    rmt = build()
    torch._dynamo.reset()
    counters.clear()
    try:
        assert compile_body(rmt.causal_lm, backend="eager") == 3  # dynamo's tracing and guards, no inductor
        assert compiled_scope(rmt.causal_lm) == "body" and not blocks_compiled(rmt.causal_lm)
        torch.testing.assert_close(loss_and_grads(rmt), eager, rtol=0, atol=0)
        torch.testing.assert_close(loss_and_grads(rmt), eager, rtol=0, atol=0)
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
        compile_blocks(rmt.causal_lm, backend="eager")
        assert compiled_scope(rmt.causal_lm) == "blocks"
        assert rmt.causal_lm.transformer._compiled_call_impl is None
        compile_body(rmt.causal_lm, backend="eager")
        assert compiled_scope(rmt.causal_lm) == "body" and not blocks_compiled(rmt.causal_lm)
    finally:
        compile_body(rmt.causal_lm, enable=False)
        torch._dynamo.reset()
    assert compiled_scope(rmt.causal_lm) is None


def test_compile_scope_is_checked_and_reaches_compile_body(monkeypatch):
    """from_backbone(compile=..., compile_scope="body") compiles the body with the mode asked for;
    a scope it does not know is a named error."""
    import rmt_peft.speedups
    from rmt_peft import MemoryConfig, RMTModel
    from rmt_peft.errors import UserError

    calls = []
    monkeypatch.setattr(rmt_peft.speedups, "compile_body", lambda model, **kwargs: calls.append(kwargs))
    for compile in (False, True, "reduce-overhead"):
        RMTModel.from_backbone(tiny_model("gpt_neo"), MemoryConfig(2, 16), verbose=False, compile=compile,
                               compile_scope="body")
    assert calls == [{}, {"mode": "reduce-overhead"}]
    with pytest.raises(UserError, match=r"compile_scope='layers'.*\['blocks', 'body'\]"):
        RMTModel.from_backbone(tiny_model("gpt_neo"), MemoryConfig(2, 16), verbose=False, compile=True,
                               compile_scope="layers")


def test_a_memory_budget_keeps_less_for_backward_and_trains_like_eager():
    """compile_blocks(memory_budget=0.3): the compiled graphs keep under 0.6x the bytes for
    backward that they keep at 1.0 (counted by hand: every tensor autograd saves), and the loss
    and gradients stay the eager model's (recomputing is exact up to float reordering)."""
    from rmt_peft import MemoryConfig, RMTModel

    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(tiny_model("gpt2", num_layers=2, hidden_size=128), MemoryConfig(2, 32),
                                 lora="all-linear", verbose=False)  # eval mode: no dropout, a deterministic loss
    ids = torch.randint(0, 128, (2, 3 * 32))

    def step():
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        rmt.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = rmt(ids, labels=ids).loss
        loss.backward()
        return sum(saved.values()), loss.detach(), [p.grad.clone() for p in rmt.parameters() if p.requires_grad]

    _, eager_loss, eager_grads = step()
    try:
        compile_blocks(rmt.causal_lm)
        full, loss, _ = step()
        compile_blocks(rmt.causal_lm, memory_budget=0.3)
        budgeted, loss, grads = step()
    finally:
        compile_blocks(rmt.causal_lm, enable=False)
        torch._dynamo.reset()
    assert budgeted < 0.6 * full, (budgeted, full)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, eager_grads, rtol=1e-4, atol=1e-6)


def test_a_memory_budget_outside_0_1_or_without_inductor_is_a_named_error():
    from rmt_peft.errors import UserError

    model = tiny_model("gpt_neo", num_layers=2)
    for budget in (0, 1.5, True, "half"):
        with pytest.raises(UserError, match=r"memory_budget=.* is invalid: expected a number in \(0, 1\]"):
            compile_blocks(model, memory_budget=budget)
    with pytest.raises(UserError, match="memory_budget=0.5 needs torch.compile's inductor backend .got 'eager'"):
        compile_body(model, memory_budget=0.5, backend="eager")
    assert compiled_scope(model) is None
