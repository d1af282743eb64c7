"""MemoryStream: same results as one forward pass, constant memory at 100k+ tokens."""
import gc

import psutil
import pytest
import torch

from rmt_peft import MemoryConfig, RMTModel, stream_tokens
from rmt_peft.errors import UserError
from rmt_peft.tiny_models import tiny_model


def test_stream_in_odd_chunks_equals_forward():
    rmt = RMTModel.from_backbone(tiny_model("gpt_neo"), MemoryConfig(num_memory_tokens=3, segment_size=8))
    with torch.no_grad():
        rmt.read_embedding.normal_()
    ids = torch.randint(2, 128, (2, 45))
    with torch.no_grad():
        full = rmt(ids, labels=ids, return_logits=True)
    reader = rmt.stream(batch_size=2, compute_loss=True, return_logits=True)
    logits, start = [], 0
    for size in (1, 7, 8, 3, 20, 6):  # chunk borders unrelated to segment borders
        logits += reader.feed(ids[:, start:start + size])
        start += size
    result = reader.finish()
    assert start == 45 and result.num_tokens == 45 and result.num_segments == 6
    torch.testing.assert_close(result.memory, full.memory, rtol=1e-4, atol=1e-5)
    assert abs(result.loss - full.loss.item()) < 1e-5
    torch.testing.assert_close(torch.tensor(result.segment_losses), full.segment_losses, rtol=1e-4, atol=1e-5)
    assert len(logits) == 5  # the short last segment is read by finish()
    torch.testing.assert_close(torch.cat(logits, 1), full.logits[:, :40], rtol=1e-4, atol=1e-5)


def test_reading_under_autocast_to_the_model_dtype_equals_reading_without_it():
    """Inside torch.autocast to the backbone's own dtype (bf16), streams and ``read`` compute
    exactly what they compute without it (autocast would only add casts: LoRA's fp32 weights down
    to bf16, norms up); ``forward`` keeps the caller's autocast, and there it changes the result,
    so the equality is the guard's doing. An fp32 model read under a bf16 autocast keeps it."""
    lora = {"r": 4, "target_modules": "all-linear", "init_lora_weights": False}
    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(tiny_model("gpt_neo").to(torch.bfloat16), MemoryConfig(num_memory_tokens=3,
                                 segment_size=8), lora=lora, verbose=False).eval()
    ids = torch.randint(2, 128, (1, 37))

    def stream(model):
        reader = model.stream(compute_loss=True)
        reader.feed(ids)
        return reader.finish()

    plain, memory = stream(rmt), rmt.read(ids)
    with torch.no_grad():
        loss = rmt(ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under, memory_under = stream(rmt), rmt.read(ids)
        with torch.no_grad():
            loss_under = rmt(ids, labels=ids).loss
    assert torch.equal(under.memory, plain.memory) and under.loss == plain.loss
    assert torch.equal(memory_under, memory)
    assert loss_under != loss

    fp32 = RMTModel.from_backbone(tiny_model("gpt_neo"), MemoryConfig(num_memory_tokens=3, segment_size=8),
                                  lora=lora, verbose=False).eval()
    plain = stream(fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not torch.equal(stream(fp32).memory, plain.memory)


def test_streaming_100k_tokens_holds_memory_flat():
    rmt = RMTModel.from_backbone(tiny_model("gpt_neo", vocab_size=128), MemoryConfig(num_memory_tokens=4, segment_size=100))
    rss = []
    chunks_per_probe = 25  # probe every 25 x 1000 tokens

    def chunks():
        g = torch.Generator().manual_seed(0)
        for i in range(120):
            if i % chunks_per_probe == 0:
                gc.collect()
                rss.append(psutil.Process().memory_info().rss)
            yield torch.randint(2, 128, (1, 1000), generator=g)

    result = stream_tokens(rmt, chunks(), compute_loss=True)
    assert result.num_tokens == 120_000 and result.num_segments == 1200
    assert 4.0 < result.loss < 6.0  # an untrained model over 128 tokens: about ln(128) = 4.85
    # Keeping each segment's logits would add ~48 MB over the run; the stream keeps none.
    growth = rss[-1] - rss[1]
    assert growth < 8 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB while streaming"


def test_cuda_graph_stream_needs_a_gpu():
    rmt = RMTModel(tiny_model("gpt_neo"), MemoryConfig(num_memory_tokens=2, segment_size=16))
    with pytest.raises(UserError, match="cuda_graph=True needs the model on a CUDA device"):
        rmt.stream(cuda_graph=True)


def test_cuda_graph_stream_refuses_compiled_code_that_would_compile_inside_the_capture():
    """A compile inside a capture fails it and breaks the CUDA context: refused up front, on any
    device, with the call that undoes the compile. Compiled blocks on GPT-Neo's SDPA path get as
    far as the device check (they capture: BENCHMARKS.md, issue 25); elsewhere transformers builds
    a mask inside the capture that the blocks never saw, and a compiled body is not known to capture."""
    from rmt_peft.attention import use_gpt_neo_sdpa
    from rmt_peft.speedups import compile_blocks, compile_body

    rmt = RMTModel(tiny_model("gpt_neo"), MemoryConfig(num_memory_tokens=2, segment_size=16))
    compile_blocks(rmt.causal_lm)  # nothing compiles until a block is called
    with pytest.raises(UserError, match=r"builds their attention mask anew inside a capture.*"
                                        r"compile_blocks\(rmt.causal_lm, enable=False\)"):
        rmt.stream(cuda_graph=True)
    use_gpt_neo_sdpa(rmt.causal_lm)
    with pytest.raises(UserError, match="needs the model on a CUDA device"):
        rmt.stream(cuda_graph=True)
    compile_body(rmt.causal_lm)
    with pytest.raises(UserError, match=r"decoder body is compiled.*compile_body\(rmt.causal_lm, enable=False\)"):
        rmt.stream(cuda_graph=True)
    armt = RMTModel.from_backbone(tiny_model("gpt_neo"), MemoryConfig(num_memory_tokens=2, segment_size=16,
                                                                      memory_kind="associative"), verbose=False)
    compile_blocks(armt.causal_lm)
    with pytest.raises(UserError, match="associative memory's read and write"):
        armt.stream(cuda_graph=True)


def test_compiled_blocks_compile_nothing_new_inside_a_capture_or_a_second_stream(monkeypatch):
    """What a capture of compiled blocks needs: the segment the capture records calls the graphs
    the warm-up compiled. transformers inside a capture (simulated: it asks torch whether one is
    on) would hand the blocks a mask they never saw (``attention.unpacked_rows``), and each new
    stream's merged LoRA copies would be new forwards to the blocks' guards (``_stream_view``)."""
    from transformers.utils import import_utils

    from rmt_peft.speedups import compile_blocks

    rmt = RMTModel.from_backbone(tiny_model("gpt_neo", num_layers=2), MemoryConfig(num_memory_tokens=2, segment_size=16),
                                 verbose=False, lora={"r": 4, "target_modules": "all-linear",
                                                      "init_lora_weights": False}).eval()
    ids = torch.randint(2, 128, (1, 3 * 16 + 1))

    def read(merge_lora):
        reader = rmt.stream(merge_lora=merge_lora)
        reader.feed(ids)
        return reader.finish().memory

    expected = {merge: read(merge) for merge in (False, True)}  # eager
    compile_blocks(rmt.causal_lm, dynamic=False)
    for merge in (False, True):
        read(merge)  # compiles
    monkeypatch.setattr(import_utils, "is_cuda_stream_capturing", lambda: True)
    with torch.compiler.set_stance("fail_on_recompile"):
        for merge in (False, True):
            torch.testing.assert_close(read(merge), expected[merge], rtol=1e-3, atol=1e-4)  # compiled vs eager rounding
    compile_blocks(rmt.causal_lm, enable=False)


@pytest.mark.parametrize("quantization", [None, pytest.param("fp8", marks=pytest.mark.cpu_fp8)])
def test_merged_copies_let_the_blocks_share_their_compiled_graphs(quantization):
    """Compiled blocks share one graph per kind of block (GPT-Neo: global and local attention)
    and segment length, with or without the stream's merged LoRA copies: 4 graphs for 4 blocks
    read in segments of one full and one short length. The copies used to be each layer's own
    ``forward``, a new object to the guards in every block: one graph per block (8 here, 48 for
    GPT-Neo-1.3B), past torch's recompile limit with another model's graphs in the process."""
    from rmt_peft.quantized_linear import quantize_linears
    from rmt_peft.speedups import compile_blocks

    backbone = tiny_model("gpt_neo", num_layers=4)
    if quantization:
        quantize_linears(backbone.to(torch.bfloat16), quantization)
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=2, segment_size=16),
                                 verbose=False, lora={"r": 4, "target_modules": "all-linear"}).eval()
    graphs = []

    def counting(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compile_blocks(rmt.causal_lm, dynamic=False, backend=counting)
    ids = torch.randint(2, 128, (1, 3 * 16 + 5))  # three segments of 16 and a short one
    for merge in (False, True):
        graphs.clear()
        reader = rmt.stream(merge_lora=merge)
        reader.feed(ids)
        reader.finish()
        assert len(reader._view.copies) == (24 if merge else 0)
        assert len(graphs) == 2 * 2, merge  # (global, local) x (16, 5) tokens
    compile_blocks(rmt.causal_lm, enable=False)


def test_graph_blocker_names_what_a_default_stream_keeps_eager(tmp_path):
    """The default stream (cuda_graph=None) captures nothing when compiled code would compile again
    inside the capture (compiled blocks off GPT-Neo's SDPA path, a compiled body) or when a
    bitsandbytes layer computes itself (8-bit; 4-bit without dequantized copies, its own cache
    or the stream's merged LoRA copies); a plain model, or 4-bit with copies, has no blocker.
    On the CPU the default is off, with nothing to log."""
    from rmt_peft import load_backbone
    from rmt_peft.attention import use_gpt_neo_sdpa
    from rmt_peft.speedups import cache_dequantized_weights, compile_blocks, compile_body, graph_blocker, graph_pays
    from rmt_peft.tiny_models import save_tiny_model

    rmt = RMTModel(tiny_model("gpt_neo"), MemoryConfig(num_memory_tokens=2, segment_size=16))
    assert graph_blocker(rmt, {}) is None
    assert graph_pays(rmt, {}) == (False, None) and rmt.stream()._graph is None
    compile_blocks(rmt.causal_lm)
    assert "attention mask anew" in graph_blocker(rmt, {})  # eager GPT-Neo: transformers' masks
    use_gpt_neo_sdpa(rmt.causal_lm)
    assert graph_blocker(rmt, {}) is None  # compiled blocks on the SDPA path capture
    compile_body(rmt.causal_lm)
    assert "decoder body is compiled" in graph_blocker(rmt, {})
    compile_body(rmt.causal_lm, enable=False)
    use_gpt_neo_sdpa(rmt.causal_lm, enable=False)

    path = save_tiny_model(str(tmp_path / "neo"), "gpt_neo", num_layers=2)
    four = load_backbone(path, quantization="4bit", dtype="float32", quantization_backend="bitsandbytes")
    assert "4-bit layers without dequantized copies" in graph_blocker(four, {})
    cache_dequantized_weights(four)
    assert graph_blocker(four, {}) is None
    cache_dequantized_weights(four, enable=False)
    rmt4 = RMTModel.from_backbone(four, MemoryConfig(num_memory_tokens=2, segment_size=16), verbose=False,
                                  lora={"r": 4, "target_modules": "all-linear"}, cache_dequantized=False)
    merged = {layer: None for layer in rmt4.modules() if hasattr(layer, "lora_A")}
    assert graph_blocker(rmt4, merged) is None  # every 4-bit layer is the base of a merged LoRA layer
    assert "4-bit" in graph_blocker(rmt4, dict(list(merged.items())[1:]))
    eight = load_backbone(path, quantization="8bit", dtype="float32", quantization_backend="bitsandbytes")
    assert "8-bit" in graph_blocker(eight, {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("quantization", [None, "4bit"])
def test_gpu_default_stream_captures_after_the_first_segments(tmp_path, quantization):
    """rmt.stream() on a GPU reads GRAPH_AFTER_SEGMENTS segments eagerly, then replays a graph:
    the memory and loss of an eager stream, with plain and with cached 4-bit weights (the
    default on a GPU); a short stream never captures."""
    from rmt_peft import load_backbone
    from rmt_peft.speedups import GRAPH_AFTER_SEGMENTS
    from rmt_peft.tiny_models import save_tiny_model

    path = save_tiny_model(str(tmp_path / "neo"), "gpt_neo", num_layers=2, hidden_size=64)
    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(load_backbone(path, quantization=quantization, dtype="float32").cuda() if
                                 quantization is None else
                                 load_backbone(path, quantization=quantization, quantization_backend="bitsandbytes"),
                                 MemoryConfig(num_memory_tokens=2, segment_size=16),
                                 lora={"r": 4, "target_modules": "all-linear", "init_lora_weights": False},
                                 verbose=False).eval()
    ids = torch.randint(0, 128, (1, 16 * (GRAPH_AFTER_SEGMENTS + 4) + 3), device="cuda")
    short = rmt.stream()
    short.feed(ids[:, :16 * GRAPH_AFTER_SEGMENTS + 1])
    assert short._graph is not None and not short._graph.graphs
    eager, default = rmt.stream(compute_loss=True, cuda_graph=False), rmt.stream(compute_loss=True)
    for reader in (eager, default):
        reader.feed(ids)
    assert len(default._graph.graphs) == 1
    a, b = eager.finish(), default.finish()
    torch.testing.assert_close(b.memory, a.memory, rtol=1e-5, atol=1e-5)
    assert b.loss == pytest.approx(a.loss, rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("merge_lora", [False, None])
def test_gpu_cuda_graph_stream_matches_eager(merge_lora):
    """Each full segment replayed as a CUDA graph: the same memory, loss and logits as the eager
    stream, with a short last segment; with peft's LoRA layers (their host work is what the graph
    removes) and with the default on a GPU, the merged copies."""
    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(tiny_model("gpt_neo").cuda(), MemoryConfig(num_memory_tokens=2, segment_size=16),
                                 lora={"r": 4, "target_modules": "all-linear", "init_lora_weights": False},
                                 verbose=False).eval()
    ids = torch.randint(0, 128, (2, 16 * 7 + 5), device="cuda")
    results = []
    for graph in (False, True):
        reader = rmt.stream(batch_size=2, compute_loss=True, return_logits=True, cuda_graph=graph,
                            merge_lora=merge_lora)
        assert bool(reader._view.copies) == (merge_lora is None)
        logits = [out for chunk in ids.split(23, dim=1) for out in reader.feed(chunk)]
        results.append((reader.finish(), torch.cat(logits, dim=1)))
    (eager, eager_logits), (graphed, graphed_logits) = results
    assert graphed.num_segments == eager.num_segments == 8
    torch.testing.assert_close(graphed.memory, eager.memory, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(graphed_logits, eager_logits, rtol=1e-5, atol=1e-5)
    assert graphed.loss == pytest.approx(eager.loss, rel=1e-5)


@pytest.mark.parametrize("quantization", [None, "4bit"])
def test_stream_with_lora_merged_into_copies_reads_as_the_merged_model(tmp_path, quantization):
    """merge_lora=True: the memory and loss of the same input streamed by merge_and_unload's
    model (fp32), an independent merge; the model's LoRA layers are untouched afterwards, and
    the default leaves them attached on the CPU."""
    from rmt_peft import load_backbone
    from rmt_peft.speedups import merge_pays
    from rmt_peft.tiny_models import save_tiny_model

    path = save_tiny_model(str(tmp_path / "neo"), "gpt_neo", num_layers=2)
    torch.manual_seed(0)
    backbone = load_backbone(path, quantization=quantization, dtype="float32", quantization_backend="bitsandbytes")
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=3, segment_size=8), verbose=False,
                                 lora={"r": 4, "target_modules": "all-linear", "init_lora_weights": False})
    assert merge_pays(rmt)[0] is False  # training mode (and the CPU)
    rmt.eval()
    device = next(rmt.parameters()).device  # bitsandbytes puts 4-bit weights on a GPU where there is one
    ids = torch.randint(2, 128, (1, 37), device=device)
    with torch.no_grad():  # first: on the CPU, bitsandbytes' first no-grad call repacks 4-bit weights (bf16 scales)
        before = rmt(ids, labels=ids).loss
    merged = rmt.merge_and_unload(dtype=torch.float32, device=device).eval()
    expected = stream_tokens(merged, [ids], compute_loss=True)

    assert bool(rmt.stream()._view.copies) == (device.type == "cuda")  # the default: merged copies on a GPU only
    reader = rmt.stream(compute_loss=True, merge_lora=True)
    assert len(reader._view.copies) == 12  # 6 linear layers x 2 blocks
    reader.feed(ids)
    got = reader.finish()
    torch.testing.assert_close(got.memory, expected.memory, rtol=1e-4, atol=1e-5)
    assert abs(got.loss - expected.loss) < 1e-4
    assert not any("forward" in vars(m) for m in rmt.modules() if hasattr(m, "lora_A"))
    with torch.no_grad():  # (on the CPU the 4-bit weights go back to bitsandbytes' plain layout: last bits)
        torch.testing.assert_close(rmt(ids, labels=ids).loss, before, rtol=1e-4, atol=0)


def test_merged_copies_refuse_weights_partitioned_by_zero3():
    """Under ZeRO-3 a rank holds a slice of each weight, and a merged copy would be a slice too:
    the default stream keeps peft's own layers (ZeRO-3's hooks gather their weights) and says
    why; merge_lora=True is an error that names ZeRO-3 and the way out."""
    from rmt_peft.speedups import merge_pays

    rmt = RMTModel.from_backbone(tiny_model("gpt_neo", num_layers=2), MemoryConfig(num_memory_tokens=2, segment_size=8),
                                 verbose=False, lora={"r": 4, "target_modules": "all-linear"}).eval()
    assert merge_pays(rmt)[1] == "weights on cpu, not a CUDA GPU"
    next(rmt.causal_lm.parameters()).ds_id = 0  # deepspeed.zero.Init's mark on the parameters it partitions
    assert merge_pays(rmt) == (False, "weights partitioned by DeepSpeed ZeRO-3")
    with pytest.raises(UserError, match="partitioned by DeepSpeed ZeRO-3.*merge_lora=False"):
        rmt.stream(merge_lora=True)


def test_streams_share_the_merged_copies_until_the_weights_change(caplog):
    """An evaluation opens a stream per document: in eval mode they reuse one set of merged copies
    (and log the merge decision once). An in-place update of a LoRA weight (an optimizer step)
    gives new copies that read as merge_and_unload of the updated model; train() frees them."""
    import logging

    rmt = RMTModel.from_backbone(tiny_model("gpt_neo", num_layers=2), MemoryConfig(num_memory_tokens=3, segment_size=8),
                                 verbose=False, lora={"r": 4, "target_modules": "all-linear",
                                                      "init_lora_weights": False}).eval()
    first, second = rmt.stream(merge_lora=True)._view.copies, rmt.stream(merge_lora=True)._view.copies
    assert len(first) == 12 and all(first[layer] is second[layer] for layer in first)

    layer = next(iter(first))
    with torch.no_grad():
        layer.lora_B["default"].weight.add_(0.5)
    ids = torch.randint(2, 128, (1, 29))
    reader = rmt.stream(compute_loss=True, merge_lora=True)
    assert reader._view.copies[layer] is not first[layer]
    reader.feed(ids)
    got = reader.finish()
    expected = stream_tokens(rmt.merge_and_unload(dtype=torch.float32).eval(), [ids], compute_loss=True)
    torch.testing.assert_close(got.memory, expected.memory, rtol=1e-4, atol=1e-5)
    assert abs(got.loss - expected.loss) < 1e-4

    rmt.train()
    assert rmt._merged_lora is None
    rmt.eval()
    rmt.stream(merge_lora=True)
    rmt.to(torch.float64)  # a move frees them too (they would stay behind on the old device or dtype)
    assert rmt._merged_lora is None
    rmt.float()
    with caplog.at_level(logging.INFO, logger="rmt_peft"):
        for _ in range(3):
            assert rmt.stream()._view.copies == {}  # the default on the CPU: peft's own layers
    assert sum("merged into copies" in r.getMessage() for r in caplog.records) == 1
