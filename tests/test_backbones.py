"""load_backbone with bitsandbytes: options, frozen quantized weights, training preparation, errors."""
import sys

import pytest
import torch

from rmt_peft import quantization as q
from rmt_peft.adapters import attach_lora
from rmt_peft.backbones import load_backbone
from rmt_peft.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def neo_path(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("neo")), "gpt_neo")


@pytest.mark.parametrize("quantization, layer, tolerance",
                         [("8bit", "Linear8bitLt", 0.05), ("4bit", "Linear4bit", 0.25)])
def test_quantized_backbone_is_frozen_and_close_to_full_precision(neo_path, quantization, layer, tolerance):
    reference = load_backbone(neo_path)
    model = load_backbone(neo_path, quantization=quantization, dtype="float32", quantization_backend="bitsandbytes")
    linears = [m for name, m in model.named_modules() if name.endswith(("q_proj", "c_fc", "out_proj"))]
    assert linears and all(type(m).__name__ == layer for m in linears)
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(ids).logits, model(ids).logits
    scale = expected.abs().max()
    assert (got - expected).abs().max() < tolerance * scale


def test_no_fp32_upcast_of_embeddings_norms_and_head(neo_path):
    model = load_backbone(neo_path, quantization="4bit", dtype="bfloat16", gradient_checkpointing=True,
                          quantization_backend="bitsandbytes")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert model.transformer.ln_f.weight.dtype == torch.bfloat16
    assert model.config.quantization_config.bnb_4bit_compute_dtype == torch.bfloat16


def test_gradient_checkpointing_recomputes_layers_with_same_gradients(neo_path):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    grads, calls = {}, {}
    for checkpointing in (False, True):
        model = load_backbone(neo_path, gradient_checkpointing=checkpointing, train=True)
        assert model.training
        model.config.attn_dropout = model.config.embed_dropout = model.config.resid_dropout = 0.0
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        torch.manual_seed(0)
        peft_model = attach_lora(model, {"target_modules": "attention", "init_lora_weights": False})
        count = [0]
        model.transformer.h[0].attn.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        peft_model(input_ids=ids, labels=ids).loss.backward()
        calls[checkpointing] = count[0]
        grads[checkpointing] = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        # non-reentrant checkpointing needs no hook that makes the embedding output require grad
        assert not getattr(model, "_require_grads_hooks", None)
    assert calls == {False: 1, True: 2}  # the layer ran again in backward
    assert grads[False].keys() == grads[True].keys() and grads[True]
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-6)


def test_error_when_bitsandbytes_cannot_run(neo_path, monkeypatch):
    import bitsandbytes

    q.check_bitsandbytes.cache_clear()
    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    with pytest.raises(RuntimeError, match=r"quantization='4bit'.*device 'cpu'.*does not support"):
        load_backbone(neo_path, quantization="4bit", quantization_backend="bitsandbytes")
    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cpu", "cuda"})
    monkeypatch.setattr(bitsandbytes.functional, "int8_vectorwise_quant",
                        lambda *a, **k: (_ for _ in ()).throw(NotImplementedError("no int8 kernel")))
    with pytest.raises(RuntimeError, match=r"quantization='8bit'.*cannot run on device 'cpu'.*no int8 kernel"):
        load_backbone(neo_path, quantization="8bit", quantization_backend="bitsandbytes")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(RuntimeError, match="needs bitsandbytes, which cannot be imported"):
        load_backbone(neo_path, quantization="4bit", quantization_backend="bitsandbytes")
    q.check_bitsandbytes.cache_clear()


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(str(tmp_path / "nope"))


def test_sdpa_for_gpt_neo_switches_to_the_exact_sdpa_attention(tmp_path):
    from rmt_peft.attention import GPT_NEO_SDPA
    from rmt_peft.tiny_models import save_tiny_model

    path = save_tiny_model(str(tmp_path / "neo"), "gpt_neo")
    eager = load_backbone(path)
    sdpa = load_backbone(path, attn_implementation="sdpa")
    assert sdpa.config._attn_implementation == GPT_NEO_SDPA
    ids = torch.randint(2, 128, (2, 40))  # longer than the tiny model's 32-token local window
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids).logits, eager(ids).logits, rtol=1e-4, atol=1e-5)
