"""The token embeddings and LM head in int8 (rmt_peft.quantized_embedding): lookups and logits
against a quantize / dequantize done by hand, the padded head's rows cut from the logits, a tied
head sharing its table, the RMT model on such a backbone against one holding the dequantized
tables in bf16, and the switch that keeps them in full precision."""
import copy

import pytest
import torch
import torch.nn.functional as F

from rmt_peft import MemoryConfig, RMTModel
from rmt_peft import quantized_linear as ql
from rmt_peft.backbones import load_backbone
from rmt_peft.quantized_embedding import (QuantizedEmbedding, QuantizedHead, QuantizedTable, embedding_matrix,
                                          quantize_embeddings)
from rmt_peft.saving import quantization_of
from rmt_peft.tiny_models import save_tiny_model, tiny_model


def int8_by_hand(weight: torch.Tensor) -> torch.Tensor:
    """Each row rounded to 127 steps of its largest magnitude, in fp32."""
    scale = weight.float().abs().amax(dim=1, keepdim=True) / 127
    return torch.round(weight.float() / scale).clamp(-127, 127) * scale


def test_lookups_and_logits_use_the_table_quantized_by_hand_and_the_padding_is_cut():
    torch.manual_seed(0)
    weight = torch.randn(50, 32, dtype=torch.bfloat16)  # 50 rows: padded to 64 in storage
    table = QuantizedTable(weight)
    expected = int8_by_hand(weight)
    assert table.weight.shape == (64, 32) and table.weight.dtype == torch.int8 and not table.weight.requires_grad
    assert table.held_weights() == 50 * 32
    torch.testing.assert_close(table.dequantize(torch.float32), expected, rtol=0, atol=1e-6)

    embedding = QuantizedEmbedding(table)
    ids = torch.tensor([[0, 49, 7], [3, 3, 12]])
    got = embedding(ids)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 32)
    assert torch.equal(got, expected[ids].to(torch.bfloat16))

    head = QuantizedHead(table)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    logits = head(x)
    grad = torch.randn_like(logits)
    logits.backward(grad)
    dequantized = expected.to(torch.bfloat16)
    assert logits.shape == (2, 5, 50)
    torch.testing.assert_close(logits, F.linear(x.detach(), dequantized), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, grad @ dequantized, rtol=0, atol=0)


@pytest.mark.parametrize("architecture, tied", [("gpt_neo", True), ("llama", False)])
def test_a_model_with_int8_tables_computes_what_bf16_tables_of_the_same_values_compute(architecture, tied):
    """The whole backbone (linear layers int8, tables int8) against a copy whose linear layers and
    tables are plain bf16 modules holding the dequantized weights: the same logits and input
    gradients. A tied head shares the embedding's table; an untied one has its own."""
    model = tiny_model(architecture).to(torch.bfloat16)
    reference = copy.deepcopy(model)
    ql.quantize_linears(model, "8bit")
    assert quantize_embeddings(model) == (1 if tied else 2)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, QuantizedEmbedding) and isinstance(head, QuantizedHead)
    assert (head.table is embedding.table) == tied
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, ql.QuantizedLinear):
                reference.get_submodule(name).weight.copy_(module.dequantize())
        reference.get_input_embeddings().weight.copy_(int8_by_hand(reference.get_input_embeddings().weight))
        if not tied:
            reference.get_output_embeddings().weight.copy_(int8_by_hand(reference.get_output_embeddings().weight))
    ids = torch.arange(2, 34).view(2, 16)
    runs = []
    for backbone in (model, reference):
        embeds = backbone.get_input_embeddings()(ids).detach().requires_grad_()
        out = backbone(inputs_embeds=embeds, labels=ids)
        out.loss.backward()
        runs.append((out.logits.detach().float(), embeds.detach(), embeds.grad))
    (logits, embeds, grad), (ref_logits, ref_embeds, ref_grad) = runs
    assert torch.equal(embeds, ref_embeds)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-4)


def test_load_backbone_holds_the_tables_in_int8_unless_told_not_to_and_adapters_record_it(tmp_path):
    path = save_tiny_model(str(tmp_path / "neo"), "gpt_neo", hidden_size=128)
    plain = load_backbone(path, dtype="bfloat16")
    table = plain.get_input_embeddings().weight
    held = load_backbone(path, quantization="8bit", quantization_backend="torch", dtype="bfloat16")
    assert isinstance(held.get_input_embeddings(), QuantizedEmbedding)
    torch.testing.assert_close(embedding_matrix(held.get_input_embeddings()).float(), int8_by_hand(table),
                               rtol=0, atol=1e-2 * table.abs().max().item())
    kept = load_backbone(path, quantization="8bit", quantization_backend="torch", dtype="bfloat16",
                         quantize_embeddings=False)
    assert type(kept.get_input_embeddings()) is torch.nn.Embedding
    assert torch.equal(kept.get_output_embeddings().weight, table)
    assert quantization_of(kept) == ("8bit", {"quantization_backend": "torch", "quantize_embeddings": False})

    # an adapter trained on bf16 tables loads on bf16 tables again, "as trained"
    rmt = RMTModel.from_backbone(kept, MemoryConfig(num_memory_tokens=2, segment_size=8), verbose=False,
                                 lora={"r": 4, "target_modules": "all-linear"})
    folder = rmt.save_pretrained(str(tmp_path / "adapter"))
    loaded = RMTModel.from_pretrained(folder, quantization="8bit", quantization_backend="torch", dtype="bfloat16",
                                      quantize_embeddings=False)
    assert type(loaded.causal_lm.get_input_embeddings()) is torch.nn.Embedding


def test_the_memory_starts_at_the_scale_of_the_dequantized_table():
    """MemoryConfig's default init std is the embedding table's: read through the int8 table's
    values, not its int8 codes (whose std is in the tens)."""
    backbone = tiny_model("gpt_neo").to(torch.bfloat16)
    expected_std = float(int8_by_hand(backbone.get_input_embeddings().weight).std())
    quantize_embeddings(backbone)
    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=40, segment_size=8), verbose=False)
    assert abs(float(rmt.memory_tokens.detach().float().std()) / expected_std - 1) < 0.1
