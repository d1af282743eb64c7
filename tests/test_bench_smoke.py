"""CPU-sized runs of every benchmark script, so they do not rot, plus checks of what the tables
rest on: the reference loop computes the same loss as RMTModel, and the FLOP count."""
import contextlib
import dataclasses
import json

import pytest
import torch

from benchmarks import bptt_memory, graph_loss, stream, train, vs_full_attention
from benchmarks.common import ReferenceRMT, build_backbone, gpt_neo_config, lora_config, train_flops_per_token
from rmt_peft.memory import MemoryConfig
from rmt_peft.recurrent import RMTModel


def test_reference_loop_computes_the_rmt_loss():
    """The reference-style loop (full forward, hidden states, concatenated logits) and RMTModel
    agree on an untrained model with the same initial memory: the speed-up is for the same work."""
    config = gpt_neo_config(tiny=True)
    backbone = build_backbone(config, None, torch.device("cpu"), attention="eager")
    reference = ReferenceRMT(backbone, num_memory_tokens=4, segment_size=32)
    ours = RMTModel(backbone, MemoryConfig(num_memory_tokens=4, segment_size=32))
    with torch.no_grad():
        ours.memory.memory_tokens.copy_(reference.memory)
    ids = torch.randint(0, config.vocab_size, (2, 96))
    with torch.no_grad():
        assert torch.allclose(reference(ids), ours(ids, labels=ids).loss, atol=1e-5)


def test_graph_loss_streams_the_loss_of_a_forward_pass():
    """The check's eager stream on a tiny FP8 backbone computes the loss ``forward`` computes for
    the whole input on the same model; on a CPU nothing is captured and the default stream is the
    same stream."""
    row = graph_loss.main(["--tiny", "--backbones", "fp8", "--compiled", "no", "--segments", "6"])["graph_loss"][0]
    config = gpt_neo_config(tiny=True)
    ids = torch.randint(0, config.vocab_size, (1, 6 * 32), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(build_backbone(config, "fp8", torch.device("cpu")),
                                 MemoryConfig(num_memory_tokens=10, segment_size=32), lora=lora_config(),
                                 verbose=False).eval()
    with torch.no_grad():
        loss = rmt(ids, labels=ids).loss.item()
    assert row["segments"] == 6 and not row["captured"]
    assert row["loss_eager"] == pytest.approx(loss, rel=1e-5)
    assert row["loss_graph"] == row["loss_eager"] and row["segment_loss_max_abs_diff"] == 0


def test_graph_loss_names_an_odd_layer_count(capsys):
    with pytest.raises(SystemExit):
        graph_loss.main(["--layers", "3"])
    assert "--layers: an even number >= 2" in capsys.readouterr().err


def test_train_flops_match_a_hand_count():
    config = gpt_neo_config(tiny=False)
    d, v, layers, n = 2048, 50257, 24, 1044
    matmul = layers * 12 * d * d + d * v
    local = sum(min(i + 1, 256) for i in range(n)) / n
    attention = 12 * 3 * 4 * d * ((n + 1) / 2) + 12 * 3 * 4 * d * local
    assert train_flops_per_token(config, n) == pytest.approx(4 * matmul + attention)


def test_train_bench_runs(tmp_path):
    out = tmp_path / "train.json"
    tables = train.main(["--tiny", "--quantization", "none", "--sections", "sweep", "--warmup", "0",
                         "--repeat", "1", "--runs", "reference:2x1", "ours:2x1", "ours-nockpt:2x1",
                         "independent-memory:2x1", "--out", str(out)])
    rows = tables["sweep_bf16"]  # "bf16" names the unquantized backbone (fp32 on the CPU)
    assert [r["segments"] for r in rows] == [2, 2, 2, 2] and all(r["tokens_per_s"] > 0 for r in rows)
    best = tables["best_bf16"][0]
    assert best["ours_speed_ratio"] == pytest.approx(best["ours_tokens_per_s"] / best["ref_tokens_per_s"])
    assert json.loads(out.read_text())["environment"]["device"] == "cpu"


def test_train_bench_forward_only_leaves_the_weights():
    """The forward-only lever (what a recomputed segment costs) runs no backward and no step:
    the LoRA weights keep their values and get no gradient; the full step changes them."""
    bench = train.Bench(gpt_neo_config(tiny=True), None, torch.device("cpu"), 32, 4, None, 0, 1)
    lora = [p for n, p in bench.peft.named_parameters() if "lora_B" in n]
    before = [p.detach().clone() for p in lora]
    bench.set_levers("sdpa", forward_only=True)
    row = bench.run("ours", 2, 1, "forward")
    assert row["forward_only"] and row["tokens_per_s"] > 0
    assert train.best_by_segments([row]) == []  # never compared as a training step
    assert all(p.grad is None and torch.equal(p, b) for p, b in zip(lora, before))
    bench.set_levers("sdpa")
    bench.run("ours", 2, 1, "step")
    assert any(not torch.equal(p, b) for p, b in zip(lora, before))


def test_train_bench_body_scope_compiles_the_whole_decoder_and_computes_the_same_loss():
    """compile_scope="body": the decoder body is one compiled call a segment (no block compiled on
    its own), the associative memory's read and write traced into it without a graph break, and
    the loss is the eager one; compile=False undoes it."""
    from torch._dynamo.utils import counters

    from rmt_peft.speedups import blocks_compiled

    bench = train.Bench(gpt_neo_config(tiny=True), None, torch.device("cpu"), 16, 4, None, 0, 1)
    bench.memory_models(associative=True)
    ids = torch.randint(0, bench.config.vocab_size, (2, 3 * 16))
    bench.set_levers("sdpa")
    with torch.no_grad():
        eager = bench.loss("associative", ids, 2, 3)
    torch._dynamo.reset()
    counters.clear()
    try:
        bench.set_levers("sdpa", compile=True, compile_scope="body")
        body = bench.ours.causal_lm.base_model
        assert body._compiled_call_impl is not None and not blocks_compiled(bench.peft)
        with torch.no_grad():
            compiled = bench.loss("associative", ids, 2, 3)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
        assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2  # first segment, later ones
    finally:
        bench.set_levers("sdpa")
        torch._dynamo.reset()
    assert body._compiled_call_impl is None


def test_train_bench_compiles_each_model_at_its_own_static_length():
    """Ours (segment + 2 x memory positions) and then the associative memory (segment + memory)
    through the same compiled block code in one process: the second model gets static graphs of
    its own, as in a process of its own. Without dynamic=False torch makes them dynamic in the
    length, and the matmuls it records carry a symbol (e.g. aten.mm_s50_64_64) instead of it."""
    import re

    from torch._dynamo.utils import counters

    bench = train.Bench(gpt_neo_config(tiny=True), None, torch.device("cpu"), 16, 4, None, 0, 1)
    bench.memory_models(associative=True)
    ids = torch.randint(0, bench.config.vocab_size, (1, 2 * 16))
    torch._dynamo.reset()
    counters.clear()
    try:
        bench.set_levers("sdpa", compile=True)
        # without the caches: a graph found in one is not lowered again, and records no matmul
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            for impl in ("ours", "associative"):
                bench.loss(impl, ids, 1, 2)
        shapes = list(counters["aten_mm_info"])
        lengths = {int(m.group(1)) for k in shapes for m in [re.match(r"aten\.mm_(\d+)_64_64$", k)] if m}
        assert {16 + 2 * 4, 16 + 4} <= lengths, shapes  # both models' lengths, each compiled as it is
        assert not [k for k in shapes if re.search(r"_s\d+", k)], shapes
    finally:
        bench.set_levers("sdpa")
        torch._dynamo.reset()


def test_quantized_bench_runs_every_section(tmp_path):
    """benchmarks.quantized on CPU-sized shapes: a row per backbone and section, none failed, each
    appended to its section's JSON lines; bf16 is the reference of the others."""
    from benchmarks import quantized

    rows = quantized.main(["--tiny", "--out-dir", str(tmp_path), "--warmup", "0", "--repeat", "1", "--shape", "2x1",
                           "--backbones", "bf16", "torch-4bit", "fp8", "--opt-shape", "2x1",
                           "--opt-backbones", "torch-8bit"])
    assert all("error" not in r for r in rows), [r for r in rows if "error" in r]
    assert [(r["section"], r["backbone"]) for r in rows] == [
        ("train", "bf16"), ("train", "torch-4bit"), ("auto", "torch-4bit"), ("train", "fp8"),
        ("stream", "bf16"), ("stream", "bf16"), ("stream", "fp8"), ("opt", "torch-8bit")]
    train_rows = [r for r in rows if r["section"] == "train"]
    assert train_rows[1]["speed_vs_bf16"] == pytest.approx(train_rows[1]["tokens_per_s"] / train_rows[0]["tokens_per_s"])
    assert 0.5 < train_rows[1]["quantized_layer_bytes_per_weight"] < 0.55  # NF4 and its scales
    assert all(r["tokens_per_s"] > 0 for r in rows)
    for section in ("train", "auto", "stream", "opt"):
        logged = [json.loads(line) for line in (tmp_path / f"{section}.jsonl").read_text().splitlines()]
        assert logged == [json.loads(json.dumps(r)) for r in rows if r["section"] == section]


def test_quantized_bench_stream_rows_run_the_rows_named_in_their_order():
    """--stream-rows: only the named stream rows, in the order given; a row compares with the plain
    bf16 stream only when that one ran before it."""
    from benchmarks import quantized

    rows = quantized.main(["--tiny", "--sections", "stream", "--stream-rows", "fp8", "bf16-autocast", "bf16", "fp8"])
    assert [(r["backbone"], r["autocast"]) for r in rows] == [("fp8", False), ("bf16", True), ("bf16", False),
                                                              ("fp8", False)], rows
    assert "time_vs_bf16" not in rows[0] and "time_vs_plain" not in rows[1]
    assert rows[3]["time_vs_bf16"] == pytest.approx(rows[3]["seconds"] / rows[2]["seconds"])


def test_quantized_bench_answers_compare_each_backbone_with_bf16(tmp_path):
    """The answers section on a briefly trained quickstart: int8 per channel keeps nearly every answer
    of bf16 (a wrong comparison would not), and FP8 on the CPU is the named error."""
    from benchmarks import quantized
    from rmt_peft.cli import main as cli

    run = tmp_path / "quickstart"
    assert cli(["train", "quickstart", f"training.output_dir={run}", "curriculum.steps_per_stage=20",
                "eval.baseline=false", "eval.num_segments=[1]", "eval.num_samples=8"]) == 0
    rows = quantized.main(["--sections", "answers", "--answers-run", str(run), "--answers-backbones", "torch-8bit",
                           "fp8", "--answers-segments", "1", "4", "--answers-samples", "32"])
    assert [(r["backbone"], r.get("segments")) for r in rows] == [
        ("bf16", 1), ("bf16", 4), ("torch-8bit", 1), ("torch-8bit", 4), ("fp8", None)]
    for row in rows[2:4]:
        assert row["answers_equal"] >= 28 and abs(row["loss_vs_bf16"]) < 0.05, row
    assert "FP8 tensor cores" in rows[4]["error"]


def test_bptt_bench_runs():
    rows = bptt_memory.main(["--tiny", "--quantization", "none", "--segments", "2", "--settings", "2"])
    assert rows[0]["setting"] == "segment + layer checkpointing" and rows[0]["tokens_per_s"] > 0


def test_stream_bench_runs():
    rows = stream.main(["--tiny", "--tokens", "256", "--attached-tokens", "128", "--chunk", "50"])
    # attached (cut to --attached-tokens), attached through merged copies, merged, the floor
    assert [r["tokens"] for r in rows] == [64, 128, 128, 256, 128, 256, 256]
    assert all(r["seconds"] > 0 for r in rows)
    assert [("time_vs_merged" in r) for r in rows] == [True, True, True, True, False, False, False]


def test_stream_bench_sorts_kernels_by_kind():
    """Kernel names from an H200 profile of a streamed GPT-Neo segment, sorted as the split counts them."""
    names = {"nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT": "matmul",
             "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
             "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128": "attention",
             "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass": "attention",
             "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float,": "other",
             "void at::native::vectorized_elementwise_kernel<8, at::native::GeluCUDAKernelImpl(at::Tenso": "other",
             "Memset (Device)": "other"}
    assert {name: stream.kernel_kind(name) for name in names} == names


def test_kernel_seconds_sum_the_kernels_by_kind_and_skip_the_ops_above_them():
    """A profile's events: CUDA kernels are summed, in all and by kind; CPU op events (whose device
    time repeats their kernels') are not."""
    from types import SimpleNamespace

    from benchmarks.common import kernel_seconds

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(key=key, device_type=device, self_device_time_total=us) for key, device, us in [
        ("nvjet_sm90_qqtst_128x128_128x6_2x1_v_bz_ovscale_TNT", cuda, 60_000),  # an FP8 matmul
        ("nvjet_sm90_tst_256x128_64x4_2x1_v_bz_coopA_NNT", cuda, 120_000),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", cuda, 57_000),
        ("triton_poi_fused_add_gelu_gelu_backward_mul_view_2", cuda, 22_000),
        ("aten::mm", cpu, 180_000)]]
    got = kernel_seconds(events)
    assert got == pytest.approx({"kernel_s": 0.259, "matmul_s": 0.18, "attention_s": 0.057, "other_s": 0.022})


def test_vs_full_attention_bench_runs():
    summary = vs_full_attention.main(["--tiny", "--modes", "infer"])
    assert [s["tokens"] for s in summary] == [128, 256]
    assert all(s["time_full_over_rmt"] > 0 for s in summary)


def test_train_bench_profile_runs():
    tables = train.main(["--tiny", "--quantization", "none", "--sections", "profile", "--warmup", "0",
                         "--repeat", "1", "--profile-runs", "ours-nockpt:2x1", "independent:2x1"])
    rows = tables["profile_bf16"]
    assert [r["segments"] * r["batch"] for r in rows] == [2, 2] and all(r["step_s"] > 0 for r in rows)
    assert all(r["kernel_s"] is None and r["gpu_busy_pct"] is None for r in rows)  # no GPU here


@pytest.mark.slow
def test_multi_gpu_bench_runs_on_cpu_ranks(tmp_path):
    """The multi-GPU benchmark on 2 CPU ranks (gloo): the single-process run with gradient
    accumulation and ZeRO-2 log the same losses, and both have a throughput."""
    from benchmarks import multi_gpu

    rows = multi_gpu.main(["--tiny", "--quantization", "none", "--zero", "2", "--steps", "2", "--warmup-steps", "1",
                           "--batch", "2", "--segments", "2", "--out", str(tmp_path / "multi_gpu.json")])
    single, zero2 = rows
    assert "error" not in single and "error" not in zero2, rows
    assert single["gpus"] == 1 and zero2["gpus"] == 2 and len(zero2["losses"]) == 2
    assert zero2["max_rel_loss_diff"] < 1e-4
    assert zero2["speedup_vs_single"] == pytest.approx(zero2["tokens_per_s"] / single["tokens_per_s"])


def test_learning_bench_writes_curves_for_every_task(tmp_path):
    from benchmarks import learning

    tiny = {"hidden_size": 64, "num_layers": 2, "num_memory_tokens": 2, "max_train_segments": 2,
            "steps_per_stage": 2, "batch_size": 4, "eval_segments": [1, 3], "eval_samples": 4}
    report = learning.main(["--runs", "memorize/paper", "detect/stable10_noise", "reasoning/baseline/1", "token/gated",
                            "--set", json.dumps(tiny), "--out-dir", str(tmp_path)])
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert [(r["config"]["task"], r["config"]["variant"], r["config"]["seed"]) for r in runs] == [
        ("memorize", "paper", 0), ("detect", "stable10_noise", 0), ("reasoning", "baseline", 1), ("token", "gated", 0)]
    assert runs[1]["config"]["memory_stability_weight"] == 10.0 and runs[2]["config"]["num_memory_tokens"] == 0
    for run in runs:  # accuracies are fractions of the 4 test samples, at each length asked for
        assert set(run["accuracy"]) == {"1", "3"} and all(a * 4 == int(a * 4) for a in run["accuracy"].values())
        assert report["accuracy"][run["config"]["task"]][run["config"]["variant"]]["3"] == [run["accuracy"]["3"]]
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learning_bench_runs_a_capacity_grid_over_pairs(tmp_path):
    """--pairs 1 2 with 2 seeds: 4 retrieval runs, each tested at K + 1 segments; capacity.txt holds
    one row per K with each variant's mean and min-max over the seeds' accuracies there."""
    import statistics

    from benchmarks import learning

    tiny = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 64, "segment_size": 8,
            "num_memory_tokens": 2, "steps_per_stage": 2, "batch_size": 4, "eval_segments": [1, 4], "eval_samples": 4}
    learning.main(["--runs", "retrieval/paper", "--pairs", "1", "2", "--seeds", "0", "1", "--set", json.dumps(tiny),
                   "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "runs.json").read_text())
    runs = report["runs"]
    assert sorted((r["config"]["retrieval_pairs"], r["config"]["seed"]) for r in runs) == [(1, 0), (1, 1), (2, 0),
                                                                                           (2, 1)]
    for run in runs:  # K + 1 segments, then the longer test lengths
        k = run["config"]["retrieval_pairs"]
        assert list(run["accuracy"]) == [str(k + 1), "4"]
    at = {k: [r["accuracy"][str(k + 1)] for r in runs if r["config"]["retrieval_pairs"] == k] for k in (1, 2)}
    assert report["capacity"] == {"paper": {"1": at[1], "2": at[2]}}
    lines = (tmp_path / "capacity.txt").read_text().splitlines()
    assert lines[0].endswith("chance 0.0625") and lines[1].split() == ["K", "|", "paper"]
    assert [line.split()[:3] for line in lines[2:]] == [
        [str(k), "|", f"{statistics.fmean(at[k]):.2f}"] for k in (1, 2)]
    assert (tmp_path / "capacity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="--pairs"):
        learning.main(["--runs", "token/paper", "--pairs", "2", "--out-dir", str(tmp_path)])


def test_associative_gates_trace_reads_the_gate_each_layer_writes_with():
    """With the gates' weights at zero each layer writes with sigmoid(its bias) at every segment:
    the trace must report exactly that, per layer and segment. It reads eager segments: on a GPU
    a stream replays CUDA graphs, which skip the hooks that record the gates (an H100 run traced
    only the segments before capture)."""
    from benchmarks.associative_gates import gate_and_key_trace
    from rmt_peft.tiny_models import tiny_model

    config = MemoryConfig(num_memory_tokens=2, segment_size=5, memory_kind="associative", associative_key_size=4)
    rmt = RMTModel.from_backbone(tiny_model("gpt_neox", num_layers=2), config, verbose=False)
    biases = (-3.0, 0.5)
    with torch.no_grad():
        for layer, bias in zip(rmt.memory.associative.layers, biases):
            layer.gate.weight.zero_()
            layer.gate.bias.fill_(bias)
    asked, stream = [], rmt.stream
    rmt.stream = lambda **kwargs: asked.append(kwargs) or stream(**kwargs)
    layers = gate_and_key_trace(rmt, torch.randint(2, 128, (3, 20)))
    assert asked == [{"batch_size": 3, "cuda_graph": False}]
    assert len(layers) == 2
    for layer, bias in zip(layers, biases):
        assert layer["gate_by_segment"] == pytest.approx([torch.sigmoid(torch.tensor(bias)).item()] * 4, abs=1e-6)
        assert -1 <= layer["key_cosine"] <= 1


def test_value_trace_measures_the_values_each_layer_writes_and_the_write_back_terms_floor():
    """Layer 0's gates shut (bias -30), layer 1's open (+30), over 4 segments: the value norms
    must be those of each layer's value projection applied to its block's outputs at the memory
    positions (recorded here by a hook of our own); with nothing ever written to layer 0 its
    every write finds nothing stored and owes the term's floor, 1; layer 1 finds nothing stored
    only at its first write (1 in 4) and, its gates open, owes nothing."""
    from benchmarks.associative_gates import value_trace
    from rmt_peft.speedups import transformer_blocks
    from rmt_peft.tiny_models import tiny_model

    config = MemoryConfig(num_memory_tokens=2, segment_size=5, memory_kind="associative", associative_key_size=4)
    rmt = RMTModel.from_backbone(tiny_model("gpt_neox", num_layers=2), config, verbose=False)
    layers = rmt.memory.associative.layers
    with torch.no_grad():
        for layer, bias in zip(layers, (-30.0, 30.0)):
            layer.gate.weight.zero_()
            layer.gate.bias.fill_(bias)
            layer.value.weight.normal_(0, 0.1)  # initialised at zero: nothing would ever be stored
    outputs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    blocks = transformer_blocks(rmt.causal_lm)
    handles = [block.register_forward_hook(
        lambda block, args, out, i=i: outputs[i].append((out if isinstance(out, torch.Tensor) else out[0])[:, -2:]))
        for i, block in enumerate(blocks)]
    trace = value_trace(rmt, torch.randint(2, 128, (3, 20)))
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        norms = [torch.stack([layer.value(out) for out in outputs[i]]).norm(dim=-1).median().item()
                 for i, layer in enumerate(layers)]
    assert [len(outputs[0]), len(outputs[1])] == [4, 4]
    shut, opened = trace
    assert shut["value_shut"] == pytest.approx(norms[0], rel=1e-5) and shut["value_open"] is None
    assert opened["value_open"] == pytest.approx(norms[1], rel=1e-5) and opened["value_shut"] is None
    assert [shut["open_rate"], opened["open_rate"]] == [0.0, 1.0]
    assert [shut["nothing_stored"], opened["nothing_stored"]] == [1.0, 0.25]
    assert shut["write_back_term"] == pytest.approx(1.0, abs=1e-6)
    assert opened["write_back_term"] == pytest.approx(0.0, abs=1e-6)


def test_starved_rows_are_rows_written_where_the_normaliser_is_zero():
    """One layer, one sample: rows of norm 1, 2, 3 and 1e-9 (not written), normaliser 1, 0, 2, 0;
    only the second row is starved, and it reads 2 / eps per unit of its feature."""
    from benchmarks.associative_gates import starved_rows
    from rmt_peft.associative import EPS, AssociativeState

    matrix = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [1e-9, 0.0]]])
    state = AssociativeState((matrix,), (torch.tensor([[1.0, 0.0, 2.0, 0.0]]),))
    (layer,) = starved_rows(state)
    assert layer["starved"] == 1.0
    assert layer["max_ratio"] == pytest.approx(2 / EPS)
    assert layer["median_ratio"] == pytest.approx(1.5, rel=1e-4)  # of 1 / (1 + eps), 2 / eps, 3 / (2 + eps)


def test_starved_trace_reads_the_state_after_each_mark():
    """The trace after 1 and 3 segments equals starved_rows of the states that reading 1 and 3
    segments at once leaves."""
    from benchmarks.associative_gates import starved_rows, starved_trace
    from rmt_peft.tiny_models import tiny_model

    config = MemoryConfig(num_memory_tokens=2, segment_size=5, memory_kind="associative", associative_key_size=4)
    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(tiny_model("gpt_neox", num_layers=2), config, verbose=False)
    with torch.no_grad():
        for layer in rmt.memory.associative.layers:
            layer.value.weight.normal_(0, 0.3)
    ids = torch.randint(2, 128, (2, 15))
    trace = starved_trace(rmt, ids, [1, 3])
    for mark, n in enumerate((1, 3)):
        expected = starved_rows(rmt.eval().read(ids[:, :5 * n]))
        for layer, want in zip(trace, expected):
            assert {key: values[mark] for key, values in layer.items()} == pytest.approx(want, rel=1e-5)


def test_noise_spikes_recomputes_the_largest_batches_with_the_noise_off_and_redrawn():
    """Without gate noise every recomputation of a batch equals its first gradient norm. With it,
    the noise-off norm is the noiseless one; other draws change a batch of several segments (its
    later segments read what the gates let in) and not a batch of one (its write is never read)."""
    from benchmarks import learning
    from benchmarks.associative_gates import gradient_norm, noise_spikes

    cfg = learning.RunConfig(**{**learning.PRESETS["cpu"], **learning.VARIANTS["associative"], "task": "token",
                                "variant": "associative", "batch_size": 4, "steps_per_stage": 4})
    torch.manual_seed(0)
    model = learning.build_model(cfg, torch.device("cpu"))
    with torch.no_grad():  # the value projection starts at zero: nothing written would depend on the gates
        for layer in model.memory.associative.layers:
            layer.value.weight.normal_(0, 0.1)
    quiet = noise_spikes(cfg, model, torch.device("cpu"), batches=8, top=8, redraws=2)
    assert len(quiet["largest"]) == 8 and quiet["max"] >= quiet["median"] > 0
    for row in quiet["largest"]:
        assert row["noise_off"][0] == pytest.approx(row["grad_norm"], rel=1e-5)
        assert all(norm == pytest.approx(row["grad_norm"], rel=1e-5) for norm, _ in row["redrawn"])
    noisy = dataclasses.replace(cfg, associative_gate_noise=2.0)
    rows = noise_spikes(noisy, model, torch.device("cpu"), batches=8, top=8, redraws=2)["largest"]
    assert {row["segments"] for row in rows} >= {1, 2}
    data = learning.Samples(noisy, "train")
    for row in rows:
        ids, labels = data.batch(row["segments"], list(range(row["start"], row["start"] + 4)), 16, torch.device("cpu"))
        assert row["noise_off"][0] == pytest.approx(gradient_norm(model, ids, labels, 0.0)[0], rel=1e-5)
        changed = [norm != pytest.approx(row["noise_off"][0], rel=1e-4) for norm, _ in row["redrawn"]]
        assert all(changed) if row["segments"] > 1 else not any(changed), row


def test_associative_gates_tests_the_same_weights_with_hard_gates(monkeypatch):
    """--hard-gates: each length is tested with soft gates, then with hard ones, on the trained weights."""
    from benchmarks import associative_gates, learning

    tested = []

    def accuracy(cfg, model, segments, device, *rest):
        tested.append((segments, model.memory_config.associative_hard_gates))
        return 0.75 if model.memory_config.associative_hard_gates else 0.5

    monkeypatch.setattr(learning, "accuracy", accuracy)
    rows = associative_gates.main(["--gate-noise", "2", "--hard-gates", "--lengths", "2", "3", "--segments", "2",
                                   "--samples", "2", "--set",
                                   '{"steps_per_stage": 1, "max_train_segments": 1, "batch_size": 2}'])
    assert tested == [(2, False), (3, False), (2, True), (3, True)]
    assert rows[0]["accuracy"] == {2: 0.5, 3: 0.5} and rows[0]["hard_gate_accuracy"] == {2: 0.75, 3: 0.75}


def test_device_choice_runs_tiny_shapes_on_the_cpu_unless_the_gpu_is_asked_for():
    from benchmarks.common import base_parser, device_of

    parse = base_parser("x").parse_args
    assert device_of(parse(["--tiny"])).type == "cpu"
    assert device_of(parse(["--tiny", "--device", "cpu"])).type == "cpu"
    if torch.cuda.is_available():
        assert device_of(parse(["--tiny", "--device", "cuda"])).type == "cuda"
    else:
        with pytest.raises(SystemExit, match="--device cuda: no CUDA device here"):
            device_of(parse(["--tiny", "--device", "cuda"]))


def test_forcing_writes_at_rate_0_leaves_the_memory_and_at_rate_1_opens_every_gate():
    """forcing_writes: at rate 0 the memory a stream reads is the model's own; at rate 1 it is
    that of the same model with its gates' weights at zero and biases high (every gate opened by
    its own logit, no forcing); at 0.5 neither. forced_write_accuracy at rate 0 is the benchmark's
    own accuracy."""
    from benchmarks import learning
    from benchmarks.associative_gates import forced_write_accuracy, forcing_writes
    from rmt_peft.tiny_models import tiny_model

    config = MemoryConfig(num_memory_tokens=2, segment_size=5, memory_kind="associative", associative_key_size=4,
                          associative_hard_gates=True)
    rmt = RMTModel.from_backbone(tiny_model("gpt_neox", num_layers=2), config, verbose=False).eval()
    with torch.no_grad():
        for layer in rmt.memory.associative.layers:
            layer.value.weight.normal_(0, 0.5)  # the value projections start at zero
            layer.gate.bias.fill_(-1.0)
    ids = torch.randint(2, 128, (64, 20))

    def memory(rate=None):
        reader = rmt.stream(batch_size=64)
        with contextlib.nullcontext() if rate is None else forcing_writes(rmt, rate):
            reader.feed(ids)
            state = reader.finish().memory  # a stream writes its last segment when it finishes
        return torch.cat([t.flatten() for t in state.tensors()])

    plain, half, full = memory(), memory(0.5), memory(1.0)
    torch.testing.assert_close(memory(0.0), plain, rtol=0, atol=0)
    with torch.no_grad():
        for layer in rmt.memory.associative.layers:
            layer.gate.weight.zero_()
            layer.gate.bias.fill_(30.0)
    opened = memory()
    scale = opened.abs().max().item()
    torch.testing.assert_close(full, opened, rtol=1e-4, atol=1e-5 * scale)
    assert (half - plain).abs().max() > 0.01 * scale and (half - opened).abs().max() > 0.01 * scale

    cfg = learning.RunConfig(**{**learning.PRESETS["cpu_text"], **learning.VARIANTS["associative_floor"],
                                "task": "detect", "variant": "associative_floor", "eval_samples": 16,
                                "associative_key_size": 8})
    model = learning.build_model(cfg, "cpu")
    assert forced_write_accuracy(cfg, model, 4, 16, 0.0, "cpu") == learning.accuracy(cfg, model, 4, "cpu")


def test_by_fact_splits_the_answers_by_the_gates_at_and_after_each_sample_s_last_fact():
    """Gates forced by their bias (weights at zero): all open, every sample's last fact is written
    and the samples whose fact lies before the second-to-last segment also wrote filler after it;
    all shut (or open below the hard gates' threshold), none is. The groups are counted here from
    the samples' layouts, the accuracy with the benchmark's own accuracy()."""
    from benchmarks import learning
    from benchmarks.associative_gates import fact_outcomes

    segments, samples = 4, 12
    cfg = learning.RunConfig(**{**learning.PRESETS["cpu_text"], **learning.VARIANTS["associative"], "task": "detect",
                                "variant": "associative", "eval_samples": samples, "associative_key_size": 8})
    model = learning.build_model(cfg, "cpu")
    layout = learning.Samples(cfg, "test").dataset(segments, samples).layout
    last = [max((end - 1) // cfg.segment_size for _, end in layout(i).fact_spans) for i in range(samples)]
    answered = sum(s == segments - 1 for s in last)
    remembered, later = samples - answered, sum(s < segments - 2 for s in last)
    assert 0 < later < remembered  # the layouts hold each kind of sample

    def force(bias: float, **config) -> dict:
        with torch.no_grad():
            for layer in model.memory.associative.layers:
                layer.gate.weight.zero_()
                layer.gate.bias.fill_(bias)
        model.memory_config = dataclasses.replace(model.memory_config, **config)
        return fact_outcomes(cfg, model, segments, samples, "cpu")

    def totals(split: dict) -> dict:
        return {group: total for group, (_, total) in split["groups"].items()}

    opened = force(3.0)
    assert totals(opened) == {"last fact in the answered segment": answered, "last fact written": remembered,
                              "filler written after it": later, "no filler written after it": remembered - later}
    assert opened["accuracy"] == pytest.approx(learning.accuracy(cfg, model, segments, "cpu"))
    assert opened["filler_open_logit_median"] == pytest.approx(3.0, abs=1e-4)
    shut = {"last fact in the answered segment": answered, "last fact not written": remembered,
            "no filler written after it": remembered}
    assert totals(force(-3.0)) == shut
    below = force(0.3, associative_hard_gates=True, associative_gate_threshold=0.5)
    assert totals(below) == shut and below["threshold"] == 0.5
    assert totals(force(0.3, associative_hard_gates=True, associative_gate_threshold=0.0))["last fact written"] == remembered
    with pytest.raises(SystemExit, match="token task"):
        fact_outcomes(dataclasses.replace(cfg, task="token"), model, segments, samples, "cpu")
