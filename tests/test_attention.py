"""The GPT-Neo SDPA path computes what eager attention computes (CPU, tiny models)."""
import copy

import pytest
import torch
from peft import LoraConfig

from rmt_peft.attention import GPT_NEO_SDPA, GPTNeoSdpaSelfAttention, use_gpt_neo_sdpa
from rmt_peft.memory import MemoryConfig
from rmt_peft.recurrent import RMTModel
from rmt_peft.tiny_models import tiny_model

WINDOW = 32  # tiny_config's GPT-Neo window; inputs below are longer so the local layers cut


def sharpened_gpt_neo(num_layers=2, dtype=torch.float32):
    """A tiny GPT-Neo whose attention scores are O(10): a missing/extra 1/sqrt(d) or a wrong
    window would change the output far beyond rounding."""
    model = tiny_model("gpt_neo", num_layers=num_layers, max_positions=128)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(12.0)
    return model.to(dtype)


def reference_attention(q, k, v, window, local, valid):
    """float64 softmax(q k^T) v with GPT-Neo's causal / sliding-window mask and padding."""
    q, k, v = q.double(), k.double(), v.double()
    n = q.shape[-2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) & ((i - j < window) if local else True)
    allowed = allowed[None, None] & valid[:, None, None, :].bool()
    scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("local", [False, True])
def test_attention_function_matches_float64_reference(local):
    torch.manual_seed(1)
    model = sharpened_gpt_neo()
    use_gpt_neo_sdpa(model)
    module = model.transformer.h[1 if local else 0].attn.attention
    assert module.attention_type == ("local" if local else "global")
    b, h, n, d = 2, 4, 70, 16
    q, k, v = (torch.randn(b, h, n, d) * 1.5 for _ in range(3))  # scores O(10)
    valid = torch.ones(b, n, dtype=torch.long)
    valid[1, 60:] = 0  # right padding in the second sample
    mask = valid[:, None, None, :].bool() & torch.ones(n, n, dtype=torch.bool).tril()
    out, _ = module._attn(q, k, v, mask)
    ref = reference_attention(q, k, v, WINDOW, local, valid)
    real = valid.bool()[:, None, :, None].expand_as(ref)
    err = (out.double()[real] - ref[real]).norm() / ref[real].norm()
    assert err < 1e-5, err
    assert torch.isfinite(out).all()


def test_switch_is_idempotent_and_names_the_implementation():
    model = sharpened_gpt_neo(num_layers=4)
    assert use_gpt_neo_sdpa(model) == 4
    assert use_gpt_neo_sdpa(model) == 0
    assert model.config._attn_implementation == GPT_NEO_SDPA
    assert all(isinstance(b.attn.attention, GPTNeoSdpaSelfAttention) for b in model.transformer.h)
    assert use_gpt_neo_sdpa(tiny_model("llama")) == 0
    assert use_gpt_neo_sdpa(model, enable=False) == 4
    assert model.config._attn_implementation == "eager"
    assert not any(isinstance(b.attn.attention, GPTNeoSdpaSelfAttention) for b in model.transformer.h)


def test_layers_of_one_attention_type_share_one_table_with_the_values_they_had():
    model = sharpened_gpt_neo(num_layers=6)
    tables = [b.attn.attention.bias.clone() for b in model.transformer.h]
    types = [b.attn.attention.attention_type for b in model.transformer.h]
    assert types == ["global", "local"] * 3 and not torch.equal(tables[0], tables[1])
    use_gpt_neo_sdpa(model)
    after = [b.attn.attention.bias for b in model.transformer.h]
    assert len({t.data_ptr() for t in after}) == 2  # one table a type, not one a layer
    assert all(torch.equal(a, t) for a, t in zip(after, tables))
    assert "transformer.h.0.attn.attention.bias" not in model.state_dict()  # still not saved


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_model_outputs_and_gradients_match_eager(padding_side):
    eager = sharpened_gpt_neo()
    sdpa = copy.deepcopy(eager)
    use_gpt_neo_sdpa(sdpa)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 90))
    mask = torch.ones_like(ids)
    if padding_side == "right":
        mask[1, 70:] = 0
    else:
        mask[1, :50] = 0  # longer than the window: some padded queries see no key in local layers
    out_e = eager(ids, attention_mask=mask).logits
    out_s = sdpa(ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(out_s).all()
    assert torch.allclose(out_s[real], out_e[real], atol=1e-4, rtol=1e-4)
    # no padding: the is_causal fast path on global layers
    assert torch.allclose(sdpa(ids).logits, eager(ids).logits, atol=1e-4, rtol=1e-4)
    # gradients through the real positions
    out_e[real].square().mean().backward()
    out_s[real].square().mean().backward()
    g_e = eager.transformer.h[1].attn.attention.q_proj.weight.grad
    g_s = sdpa.transformer.h[1].attn.attention.q_proj.weight.grad
    assert torch.allclose(g_s, g_e, atol=1e-5, rtol=1e-3)


def test_generation_with_cache_matches_eager():
    eager = sharpened_gpt_neo()
    sdpa = copy.deepcopy(eager)
    use_gpt_neo_sdpa(sdpa)
    ids = torch.randint(0, 128, (1, 40))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=1)
    assert torch.equal(sdpa.generate(ids, **kwargs), eager.generate(ids, **kwargs))


def test_bf16_close_to_fp32_eager():
    eager = sharpened_gpt_neo()
    sdpa = copy.deepcopy(eager).to(torch.bfloat16)
    use_gpt_neo_sdpa(sdpa)
    ids = torch.randint(0, 128, (2, 80))
    ref = eager(ids).logits
    out = sdpa(ids).logits.float()
    assert ((out - ref).norm() / ref.norm()) < 2e-2


def test_rmt_with_lora_on_sdpa_matches_eager():
    eager = sharpened_gpt_neo()
    sdpa = copy.deepcopy(eager)
    cfg = MemoryConfig(num_memory_tokens=4, segment_size=40)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    torch.manual_seed(3)
    rmt_e = RMTModel.from_backbone(eager, cfg, lora=lora, speedups=False)
    torch.manual_seed(3)
    rmt_s = RMTModel.from_backbone(sdpa, cfg, lora=lora)  # SDPA (and the fused GELU) by default
    assert sum(isinstance(m, GPTNeoSdpaSelfAttention) for m in rmt_s.modules()) == 2
    assert not any(isinstance(m, GPTNeoSdpaSelfAttention) for m in rmt_e.modules())
    ids = torch.randint(0, 128, (2, 100))
    out_e, out_s = rmt_e(ids, labels=ids), rmt_s(ids, labels=ids)
    assert torch.allclose(out_s.loss, out_e.loss, atol=1e-5)
    assert torch.allclose(out_s.memory, out_e.memory, atol=1e-4)


def capturing(monkeypatch):
    """transformers as it behaves inside a CUDA-graph capture (it asks torch whether one is on)."""
    from transformers.utils import import_utils

    monkeypatch.setattr(import_utils, "is_cuda_stream_capturing", lambda: True)


def sdpa_calls(monkeypatch) -> list[tuple[bool, bool]]:
    """(a mask was passed, is_causal) for every SDPA call from here on."""
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask is not None, is_causal))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def test_no_mask_without_padding_inside_a_capture_for_callers_that_never_pack(monkeypatch):
    """Inside a capture transformers cannot read the position ids to rule out packed sequences, so
    it builds a full mask and the global layers lose the causal kernel (and compiled blocks see a
    mask they never saw, and compile inside the capture). ``unpacked_rows`` keeps the mask out,
    with the same outputs; ``RMTModel`` runs its segments inside it."""
    from rmt_peft.attention import unpacked_rows

    model = sharpened_gpt_neo()
    use_gpt_neo_sdpa(model)
    ids = torch.randint(0, 128, (2, 60))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits  # no cache: transformers checks the positions for packing
        capturing(monkeypatch)
        calls = sdpa_calls(monkeypatch)
        as_transformers_does = model(ids, use_cache=False).logits
        assert calls[0] == (True, False)  # layer 0 is global: a mask, not the causal kernel
        calls.clear()
        with unpacked_rows():
            got = model(ids, use_cache=False).logits
        assert calls == [(False, True), (True, False)]  # global: causal kernel; local: its window table
    torch.testing.assert_close(as_transformers_does, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    rmt = RMTModel.from_backbone(sharpened_gpt_neo(), MemoryConfig(num_memory_tokens=4, segment_size=40),
                                 verbose=False).eval()
    calls.clear()
    with torch.no_grad():
        rmt(ids)
    assert calls and all(call == (False, True) for call in calls[::2])  # every global layer of every segment
    calls.clear()
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # padding: a mask is needed, and built
    with torch.no_grad():
        rmt(ids, attention_mask=mask)
    assert all(has_mask for has_mask, _ in calls)
