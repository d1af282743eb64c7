"""Torch-held quantized backbones (rmt_peft.quantized_linear, quantization_backend="torch"): each
format against a quantize / dequantize done by hand, input gradients through the frozen weight,
a LoRA training step against full-precision layers holding the dequantized weights, and the errors
on devices that cannot run a format (the choice of backend: tests/test_quantization.py)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from rmt_peft import MemoryConfig, RMTModel, stream_tokens
from rmt_peft import quantized_linear as ql
from rmt_peft.adapters import attach_lora
from rmt_peft.backbones import load_backbone
from rmt_peft.errors import UserError
from rmt_peft.saving import quantization_of
from rmt_peft.tiny_models import save_tiny_model, tiny_model

# each format, FP8 where the CPU can run it (conftest.py)
FORMATS = [pytest.param(f, marks=pytest.mark.cpu_fp8) if f == "fp8" else f for f in ql.FORMATS]
# QLoRA's 16 NF4 values (Dettmers et al. 2023, appendix E) to 4 digits, as torchao's format holds them
NF4 = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379,
                    0.4407, 0.5626, 0.7230, 1.0])


def by_hand(layer: ql.QuantizedLinear, weight: torch.Tensor) -> torch.Tensor:
    """The weight ``layer`` should compute with, quantized and dequantized here (fp32)."""
    w = weight.float()
    if layer.format == "8bit":
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        q = torch.round(w / scale).clamp(-127, 127)
        assert torch.equal(layer.weight, q.to(torch.int8))
        return q * scale
    if layer.format == "fp8":
        scale = w.abs().amax(dim=1, keepdim=True) / 448
        q = (w / scale).to(torch.float8_e4m3fn)
        assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))
        return q.float() * scale
    # two 4-bit indices a byte (high nibble first), blocks of 64 with double-quantized scales
    packed = layer.weight.to(torch.int64)
    index = torch.stack([packed >> 4, packed & 15], dim=1).flatten()
    blocks = layer.nf4_scalers.view(layer.nf4_factors.shape[0], -1)  # int8, one factor per block of scalers
    scalers = (blocks / layer.nf4_factors[:, None]).flatten().to(weight.dtype) + layer.nf4_mean
    return (NF4.to(weight.dtype)[index].view(-1, 64) * scalers[:, None]).view(weight.shape).float()  # in bf16


def rowwise_fp8(t: torch.Tensor) -> torch.Tensor:
    """Each row scaled to e4m3 and back (what the FP8 matmuls do to their left operand)."""
    scale = t.float().abs().amax(dim=-1, keepdim=True) / 448
    return (t.float() / scale).to(torch.float8_e4m3fn).float() * scale


@pytest.mark.parametrize("format", FORMATS)
def test_each_format_computes_with_its_weight_dequantized_by_hand(format):
    torch.manual_seed(0)
    weight = torch.randn(96, 128, dtype=torch.bfloat16) * 0.05
    bias = torch.randn(96, dtype=torch.bfloat16)
    layer = ql.QuantizedLinear(weight, bias, format)
    expected_weight = by_hand(layer, weight)
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert y.dtype == torch.bfloat16 and not layer.weight.requires_grad and layer.weight.grad is None
    dequantized = expected_weight.to(torch.bfloat16)
    torch.testing.assert_close(layer.dequantize(), dequantized, rtol=0, atol=0)
    if format == "fp8":  # forward: both operands e4m3, the input scaled per row
        out = rowwise_fp8(x.detach()) @ expected_weight.t() + bias.float()
        tolerance = dict(rtol=2e-2, atol=2e-2)
    else:  # bf16 matmuls with the dequantized weight
        out = F.linear(x.detach(), dequantized) + bias
        tolerance = dict(rtol=0, atol=0)
    torch.testing.assert_close(y.float(), out.float(), **tolerance)
    # backward, every format: the gradient times the dequantized weight, in the gradient's dtype
    torch.testing.assert_close(x.grad, grad @ dequantized, rtol=0, atol=0)
    # and close to the full-precision layer
    full = F.linear(x.detach().float(), weight.float(), bias.float())
    assert (y.float() - full).abs().max() < 0.1 * full.abs().max()


@pytest.mark.parametrize("format", FORMATS)
def test_under_autocast_each_format_computes_in_the_autocast_dtype_as_a_linear_layer_does(format):
    """An fp32 input (a LayerNorm's output under autocast) is cast to bf16 first, as autocast casts
    an nn.Linear's: the output is bf16 (FP8 returned fp32, doubling every activation after it) and
    equal to the layer's on the bf16 input, and the gradient reaches the fp32 input as fp32."""
    torch.manual_seed(0)
    layer = ql.QuantizedLinear(torch.randn(96, 128, dtype=torch.bfloat16) * 0.05, None, format)
    linear = torch.nn.Linear(128, 96, bias=False, dtype=torch.bfloat16)
    x = torch.randn(3, 5, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected_dtype = layer(x), linear(x).dtype
    y.float().square().sum().backward()
    assert y.dtype == expected_dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    assert torch.equal(y, layer(x.detach().to(torch.bfloat16)))


@pytest.mark.parametrize("format", FORMATS)
def test_a_lora_step_matches_full_precision_layers_holding_the_dequantized_weights(format):
    """Loss, LoRA gradients and the gradient reaching the inputs through every frozen quantized layer,
    against the same model whose linear layers are plain bf16 layers with the dequantized weights."""
    model = tiny_model("gpt_neo").to(torch.bfloat16)
    reference = copy.deepcopy(model)
    assert ql.quantize_linears(model, format) == 12  # 6 linear layers x 2 blocks; the LM head stays
    for name, module in model.named_modules():
        if isinstance(module, ql.QuantizedLinear):
            reference.get_submodule(name).weight.data.copy_(module.dequantize())
    lora = {"r": 4, "target_modules": "all-linear", "init_lora_weights": False}
    runs = []
    for backbone in (model, reference):
        torch.manual_seed(0)
        peft_model = attach_lora(backbone, lora)
        embeds = backbone.get_input_embeddings()(torch.arange(2, 34).view(2, 16)).detach().requires_grad_()
        loss = peft_model(inputs_embeds=embeds, labels=torch.arange(2, 34).view(2, 16)).loss
        loss.backward()
        grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        runs.append((loss.detach(), embeds.grad, grads))
    (loss, grad_in, grads), (ref_loss, ref_grad_in, ref_grads) = runs
    exact = format != "fp8"  # FP8 also quantizes the activations and gradients
    tolerance = dict(rtol=1e-3, atol=1e-4) if exact else dict(rtol=0.05, atol=0.02)
    torch.testing.assert_close(loss, ref_loss, **tolerance)
    assert ref_grad_in.abs().max() > 0
    if exact:
        torch.testing.assert_close(grad_in.float(), ref_grad_in.float(), **tolerance)
    else:  # e4m3 keeps 3 mantissa bits: about 4% error per matmul (by hand above), compounding over the layers
        assert cosine(grad_in, ref_grad_in) > 0.85
    assert grads.keys() == ref_grads.keys() and len(grads) == 24
    for name in grads:
        if exact:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-2, atol=1e-4, msg=name)
        else:
            assert cosine(grads[name], ref_grads[name]) > 0.8, name


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def test_load_backbone_quantizes_onto_the_device_and_reports_bytes_per_weight(tmp_path):
    path = save_tiny_model(str(tmp_path / "neo"), "gpt_neo", hidden_size=128)
    reference = load_backbone(path, dtype="bfloat16")
    ids = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits.float()
    layer_weights = 2 * (4 * 128 * 128 + 2 * 4 * 128 * 128)
    table_weights = 128 * 128  # the tied embedding / LM head (vocabulary 128), int8: 1 byte + a scale a row
    for quantization, low, high in (("8bit", 1.0, 1.04), ("4bit", 0.5, 0.6)):
        model = load_backbone(path, quantization=quantization, quantization_backend="torch", dtype="bfloat16")
        layers = [m for m in model.modules() if isinstance(m, ql.QuantizedLinear)]
        assert len(layers) == 12 and all(layer.compute_dtype == torch.bfloat16 for layer in layers)
        assert not any(p.requires_grad for p in model.parameters())
        assert quantization_of(model) == (quantization, {"quantization_backend": "torch", "quantize_embeddings": True})
        size, weights = ql.quantized_bytes(model)
        assert weights == layer_weights + table_weights
        layer_bytes = size - (table_weights + 4 * 128)
        assert low < layer_bytes / layer_weights < high
        with torch.no_grad():
            got = model(ids).logits.float()
        assert (got - expected).abs().max() < 0.25 * expected.abs().max()


def test_merging_and_merged_stream_copies_use_the_dequantized_weights(tmp_path):
    """merge_and_unload and the stream's merged LoRA copies dequantize the torch-held weights: all
    three read the same memory as peft's own layers over the quantized ones."""
    path = save_tiny_model(str(tmp_path / "neo"), "gpt_neo")
    backbone = load_backbone(path, quantization="8bit", quantization_backend="torch", dtype="float32")
    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=3, segment_size=8), verbose=False,
                                 lora={"r": 4, "target_modules": "all-linear", "init_lora_weights": False}).eval()
    ids = torch.randint(2, 128, (1, 37), generator=torch.Generator().manual_seed(0))
    attached = stream_tokens(rmt, [ids], compute_loss=True)
    reader = rmt.stream(compute_loss=True, merge_lora=True)
    assert len(reader._view.copies) == 12
    reader.feed(ids)
    copies = reader.finish()
    merged = stream_tokens(rmt.merge_and_unload(dtype=torch.float32), [ids], compute_loss=True)
    for got in (copies, merged):
        torch.testing.assert_close(got.memory, attached.memory, rtol=1e-4, atol=1e-4)
        assert abs(got.loss - attached.loss) < 1e-4


def test_fp8_activation_rows_map_their_largest_magnitude_to_448_in_range_without_a_clamp():
    """The activations' rows (what the FP8 matmul's left operand is) against the clamped formula by
    hand, over magnitudes from 1e-8 to 1e30, a zero row and a constant row: the same e4m3 values,
    each row's largest magnitude at 448, nothing out of range (an overflowing cast gives NaN)."""
    torch.manual_seed(0)
    rows = torch.cat([torch.randn(64, 96) * torch.logspace(-8, 30, 64)[:, None],
                      torch.zeros(1, 96), torch.full((1, 96), -3.3)])
    for dtype in (torch.float32, torch.bfloat16):
        t = rows.to(dtype)
        q, scale = ql._rowwise_fp8(t)
        expected_scale = t.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 448
        expected = (t.float() / expected_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(scale, expected_scale)
        assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8)), dtype
        assert torch.isfinite(q.float()).all()
        assert torch.equal(q.float().abs().amax(dim=-1)[:-2], torch.full((64,), 448.0))
        assert q.float()[-2].abs().max() == 0 and (q.float()[-1] == -448).all()


@pytest.mark.cpu_fp8
def test_fp8_merged_stream_copies_stay_fp8(monkeypatch):
    """FP8 layers' merged copies are FP8 again (1 byte per weight, FP8 matmuls), and the stream
    reads through them: peft's own LoRA forward is not called (it was: the copies, modules, became
    child modules named "forward", never called and kept after the stream), the state dict keeps
    its keys, and with a LoRA of a trained one's size (B ~ N(0, 0.02)) the stream is about as close
    to the bf16 model's (the same weights unquantized, the same LoRA) as peft's own layers over the
    FP8 weights: the merged copy rounds W + BA to e4m3 once, peft's layers round W alone."""
    backbone = tiny_model("gpt_neo").to(torch.bfloat16)
    unquantized = copy.deepcopy(backbone)
    ql.quantize_linears(backbone, "fp8")
    models = []
    for model in (backbone, unquantized):
        torch.manual_seed(0)
        models.append(RMTModel.from_backbone(model, MemoryConfig(num_memory_tokens=3, segment_size=8), verbose=False,
                                             lora={"r": 4, "target_modules": "all-linear"}).eval())
        torch.manual_seed(1)
        for name, param in models[-1].named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.02)
    rmt, reference = models
    ids = torch.randint(2, 128, (1, 37), generator=torch.Generator().manual_seed(0))
    truth = stream_tokens(reference, [ids], compute_loss=True)
    attached = stream_tokens(rmt, [ids], compute_loss=True)
    reader = rmt.stream(compute_loss=True, merge_lora=True)
    copies = list(reader._view.copies.values())
    assert len(copies) == 12 and all(isinstance(c, ql.QuantizedLinear) and c.format == "fp8" for c in copies)
    keys = set(rmt.state_dict())
    from peft.tuners.lora import layer as lora_layer

    def unmerged(*args, **kwargs):
        raise AssertionError("a LoRA layer computed itself inside a merged stream")

    with monkeypatch.context() as patch:
        patch.setattr(lora_layer.Linear, "forward", unmerged)
        reader.feed(ids)
        got = reader.finish()
    assert set(rmt.state_dict()) == keys
    assert cosine(attached.memory, truth.memory) > 0.995 and cosine(got.memory, truth.memory) > 0.995
    assert abs(got.loss - truth.loss) < 0.01 * truth.loss and abs(attached.loss - truth.loss) < 0.01 * truth.loss


def test_fp8_is_refused_on_the_cpu_and_on_gpus_without_fp8_tensor_cores(tmp_path, monkeypatch):
    path = save_tiny_model(str(tmp_path / "neo"), "gpt_neo")
    with pytest.raises(UserError, match="quantization='fp8'.*compute capability >= 8.9.*'cpu'"):
        load_backbone(path, quantization="fp8", device_map="cpu")  # on the CPU also where a GPU is
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100")
    with pytest.raises(UserError, match="NVIDIA A100 has 8.0"):
        ql.check_fp8("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    ql.check_fp8("cuda:0")  # Hopper: no error


@pytest.mark.slow
@pytest.mark.cpu_fp8
def test_compiled_layers_compute_what_eager_layers_compute_and_keep_no_weight_copies():
    """torch.compile traces each format's autograd function: same outputs and input gradients as
    eager, and between forward and backward it keeps no copy of the weight (dequantized, or NF4's
    unpacked indices): every large tensor saved for backward is one the layer holds anyway."""
    torch.manual_seed(0)
    for format in ql.FORMATS:
        layer = ql.QuantizedLinear(torch.randn(256, 128, dtype=torch.bfloat16) * 0.05, None, format)
        block = torch.nn.Sequential(torch.nn.LayerNorm(128, dtype=torch.bfloat16), layer, torch.nn.GELU())
        x = torch.randn(8, 128, dtype=torch.bfloat16, requires_grad=True)
        block(x).square().sum().backward()
        expected, expected_grad = block(x).detach(), x.grad.clone()
        x.grad = None
        compiled = torch.compile(block)
        compiled(x).square().sum().backward()  # compiles
        # bf16 rounding differs where compile fuses
        torch.testing.assert_close(x.grad, expected_grad, rtol=0.05, atol=0.05 * expected_grad.abs().max().item())
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = compiled(x)
        torch.testing.assert_close(out.detach(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
        own = {t.data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
        large = [(tuple(t.shape), t.dtype) for t in saved if t.numel() >= 256 * 128 // 4 and t.data_ptr() not in own]
        assert saved and not large, (format, large)


def test_eager_dequantization_is_one_pass_with_the_by_hand_values():
    """Outside compiled blocks (the int8 LM head, twice per loss chunk) a weight is dequantized
    without an fp32 copy of it (each such copy was a pass through memory: 9% of a GPU step), on
    the CPU by one mul and on a GPU by one compiled kernel (run here on the CPU); both give the
    by-hand fp32 product rounded once."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Outputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen += [(func, t.dtype, t.numel()) for t in (out if isinstance(out, (tuple, list)) else [out])
                          if isinstance(t, torch.Tensor)]
            return out

    torch.manual_seed(0)
    weight = torch.randn(192, 64) * 0.05
    for qweight, scale in (ql.quantize_int8(weight), ql.quantize_fp8(weight)):
        expected = (qweight.float() * scale).to(torch.bfloat16)  # by hand, in fp32, rounded once
        with Outputs() as mode:
            got = ql.dequantize_scaled(qweight, scale, torch.bfloat16)
        assert torch.equal(got, expected), qweight.dtype
        # the weight-sized results: int8 -> the bf16 output (allocated, then written by the mul);
        # e4m3 (not promoted by torch) is read as fp32 first
        sized = [(f.__name__, d) for f, d, n in mode.seen if n == weight.numel()]
        first = [("_to_copy.default", torch.float32)] if qweight.dtype != torch.int8 else []
        assert sized == first + [("empty.memory_format", torch.bfloat16), ("mul.out", torch.bfloat16)], sized
        assert torch.equal(ql._fused_dequantize()(qweight, scale, torch.bfloat16), expected)
