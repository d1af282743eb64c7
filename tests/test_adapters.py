"""LoRA presets per architecture, LoraConfig building, freezing and the trainable summary."""
import re

import pytest
import torch
from peft import LoraConfig
from transformers.pytorch_utils import Conv1D

from rmt_peft import MemoryConfig, RMTModel, load_backbone
from rmt_peft.adapters import LORA_TARGETS, attach_lora, lora_config, trainable_summary
from rmt_peft.tiny_models import ARCHITECTURES, save_tiny_model, tiny_model

MEMORY = MemoryConfig(num_memory_tokens=4, segment_size=8)


def linear_layers(model):
    """Names of all linear layers but the output head, and those inside attention blocks."""
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and "lm_head" not in n]
    attention = [n for n in names if re.search(r"\.(attn|attention|self_attn)\.", n)]
    return set(names), set(attention)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_presets_target_the_right_layers(architecture):
    all_linear, attention = linear_layers(tiny_model(architecture, num_layers=2))
    assert attention and attention < all_linear
    for preset, expected in (("attention", attention), ("all-linear", all_linear)):
        peft_model = attach_lora(tiny_model(architecture, num_layers=2), preset)
        wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                   if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")}
        assert wrapped == expected, (architecture, preset)


def test_lora_config_from_preset_dict_and_config():
    config = lora_config({"target_modules": "all-linear", "r": 4, "lora_dropout": 0.1}, "opt")
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 16, 0.1)
    assert lora_config({"r": 2}, "llama").target_modules == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert lora_config("attention", "gpt2").fan_in_fan_out is True
    explicit = {"target_modules": ["q_proj"], "r": 2}
    assert lora_config(explicit, "bloom").target_modules == {"q_proj"}  # no preset needed
    given = LoraConfig(r=3, target_modules=["fc1"])
    assert lora_config(given, "opt") is given
    with pytest.raises(ValueError, match="LoRA preset 'mlp' is not known"):
        lora_config("mlp", "opt")
    with pytest.raises(ValueError, match="no 'attention' LoRA preset for architecture 'bloom'"):
        lora_config("attention", "bloom")
    with pytest.raises(TypeError, match="lora must be"):
        lora_config(8, "opt")


def test_from_backbone_trains_only_lora_and_fp32_memory(capsys):
    backbone = tiny_model("opt").to(torch.bfloat16)
    base_params = sum(p.numel() for p in backbone.parameters())
    rmt = RMTModel.from_backbone(backbone, MEMORY, lora={"target_modules": "attention", "r": 4})
    printed = capsys.readouterr().out
    trainable = {n for n, p in rmt.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in rmt.named_parameters() if "lora_" in n or n.startswith("memory.")}
    assert {"memory.memory_tokens", "memory.read_embedding", "memory.write_embedding"} <= trainable
    assert all(getattr(rmt.memory, n).dtype == torch.float32 for n in ("memory_tokens", "read_embedding"))
    # independent count: 2 layers x 4 projections x r(in + out), and 3 memory matrices of 4 x 64
    lora, memory = 2 * 4 * 4 * (64 + 64), 3 * 4 * 64
    summary = trainable_summary(rmt)
    assert summary in printed
    assert f"trainable params: {lora + memory:,} (lora {lora:,}, memory {memory:,})" in summary
    assert f"all params: {base_params + lora + memory:,}" in summary


def test_full_finetuning_keeps_requires_grad():
    backbone = tiny_model("gpt_neo")
    backbone.transformer.wpe.weight.requires_grad_(False)  # the user's choice stays
    rmt = RMTModel.from_backbone(backbone, MEMORY, verbose=False)
    frozen = {n for n, p in rmt.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.transformer.wpe.weight"}


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_training_steps_on_quantized_backbone(tmp_path, quantization):
    path = save_tiny_model(str(tmp_path / "opt"), "opt")
    backbone = load_backbone(path, quantization=quantization, dtype="float32", quantization_backend="bitsandbytes")
    rmt = RMTModel.from_backbone(backbone, MEMORY, lora="all-linear", verbose=False).train()
    # 4-bit weights are packed (2 per byte): the summary counts weights, not bytes
    full = sum(p.numel() for p in tiny_model("opt").parameters())
    assert f"all params: {full + 2 * 8 * (4 * 128 + 2 * 320) + 3 * 4 * 64:,}" in trainable_summary(rmt)
    frozen_before = {n: p.detach().clone() for n, p in rmt.named_parameters() if not p.requires_grad}
    memory_before = rmt.memory_tokens.detach().clone()
    ids = torch.randint(2, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in rmt.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = rmt(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(rmt.memory_tokens.detach(), memory_before)
    for name, value in frozen_before.items():
        assert torch.equal(dict(rmt.named_parameters())[name].detach(), value), name


def test_all_linear_falls_through_to_peft_for_an_architecture_without_presets():
    from transformers import AutoModelForCausalLM, BloomConfig

    def bloom():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4))

    assert bloom().config.model_type not in LORA_TARGETS
    all_linear, _ = linear_layers(bloom())
    peft_model = attach_lora(bloom(), "all-linear")
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
               if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")}
    assert wrapped == all_linear and len(all_linear) == 8  # 4 linear layers in each of 2 blocks
