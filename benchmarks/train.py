"""Training throughput, peak memory and MFU: the reference RMT loop against ours.

GPT-Neo-1.3B shape with random weights, LoRA r=16 on all linear layers, 10 memory tokens,
segments of 1024 tokens, fused AdamW; one step = forward + backward + optimizer step.

Sections (``--sections``):
  levers  one batch shape, each lever on its own: reference loop (eager / SDPA attention), ours
          without checkpointing (eager / SDPA), with segment checkpointing, with segment + layer
          checkpointing, and the same segments as independent sequences (no memory).
  sweep   reference vs ours (SDPA + segment checkpointing) over 1, 2, 4, ... segments, each at
          the batch sizes that fit; the best batch per segment count and the ratio. Or exact
          ``--runs IMPL:SEGMENTSxBATCH``; IMPL names are the keys of SWEEP, among them
          independent* (the segments as separate sequences without memory tokens) and
          independent-memory* (each with the initial memory: the same positions, no recurrence).

    python -m benchmarks.train --quantization 4bit none --sections levers sweep --out train.json
"""
from __future__ import annotations

import dataclasses

import torch

from rmt_peft.adapters import parameter_count
from rmt_peft.attention import use_gpt_neo_sdpa
from rmt_peft.backbones import enable_checkpointing
from rmt_peft.memory import MemoryConfig
from rmt_peft.recurrent import RMTModel
from rmt_peft.speedups import cache_dequantized_weights, cache_pays, compile_blocks, compile_body, use_fused_gelu

from .common import (TORCH_HELD, ReferenceRMT, base_parser, bf16_matmul_tflops, build_backbone, device_of, environment,
                     free, gpt_neo_config, kernel_seconds, lora_config, measure, optimizer_for, print_table,
                     stop_checkpointing_layers, train_flops_per_token, write_json)


class Bench:
    """One backbone with LoRA, shared by the reference loop and ours (same weights, same LoRA)."""

    def __init__(self, config, quantization, device, segment, memory_tokens, peak_tflops, warmup, repeat):
        from peft import get_peft_model

        self.config, self.device, self.segment, self.m = config, device, segment, memory_tokens
        self.quantization = quantization or "bf16"
        self.peak_tflops, self.warmup, self.repeat = peak_tflops, warmup, repeat
        self.autocast = self.dequant_cache = self.forward_only = False
        self.compiled = (False, "blocks", False, 1.0, ())
        free()
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        backbone = build_backbone(config, quantization, device, attention="sdpa")
        # what the frozen backbone holds on the GPU, per weight (bitsandbytes' packed 4-bit counted whole)
        self.backbone_bytes = torch.cuda.memory_allocated(device) - before if before is not None else None
        self.frozen_weights = sum(parameter_count(p) for p in backbone.parameters())
        self.peft = get_peft_model(backbone, lora_config())
        self.reference = ReferenceRMT(self.peft, memory_tokens, segment)
        self.ours = RMTModel(self.peft, MemoryConfig(num_memory_tokens=memory_tokens, segment_size=segment,
                                                     loss_chunk_size=1024))
        self.independent = RMTModel(self.peft, MemoryConfig(num_memory_tokens=0, segment_size=segment))
        self.associative = None  # built on first use (its projections take GPU memory): see memory_models
        models = (("reference", self.reference), ("ours", self.ours), ("independent", self.independent))
        for _, model in models:
            model.train()
        self.optimizers = {name: optimizer_for(model) for name, model in models}
        self.optimizers["independent-memory"] = self.optimizers["ours"]

    def memory_models(self, associative: bool = False) -> list[RMTModel]:
        """Ours, the no-memory model and (built when first asked for) the associative memory (ARMT)
        on the same backbone, whose hooks act only inside its own calls."""
        if associative and self.associative is None:
            self.associative = RMTModel(self.peft, dataclasses.replace(self.ours.memory_config,
                                                                       memory_kind="associative")).train()
            self.optimizers["associative"] = optimizer_for(self.associative)
        return [m for m in (self.ours, self.independent, self.associative) if m is not None]

    def set_levers(self, attention: str, checkpoint_segments: bool = False, checkpoint_layers: bool = False,
                   fused_gelu: bool = False, autocast: bool = False, compile: bool | str = False,
                   uncheckpointed: int = 0, policy: str = "recompute_all", dequant_cache: bool = False,
                   forward_only: bool = False, compile_scope: str = "blocks", dynamic: bool = False,
                   memory_budget: float = 1.0):
        """compile: False, True (torch.compile's default mode) or a torch.compile mode, of each block
        (``compile_scope`` "blocks", compile_blocks) or of the decoder body as a whole, its blocks and
        their hooks in one graph a segment ("body": one compiled call a segment instead of one a
        layer, and with CUDA graphs one recording a segment instead of one a layer).
        dynamic: graphs with every size symbolic (torch.compile(dynamic=True)), an upper bound on
        what a run whose segment length changes pays (after a second length, e.g. a short last
        segment, torch compiles the length as a symbol); False: static, as a process training one
        model at one length.
        memory_budget: the compiled graphs' activation budget (speedups.compiled_call).
        forward_only: the step is the forward alone (with gradients on, so it keeps what backward
        needs): what segment checkpointing runs again for every checkpointed segment.
        uncheckpointed / policy: MemoryConfig.uncheckpointed_segments / checkpoint_policy;
        dequant_cache: speedups.cache_dequantized_weights (NF4 only); "auto": from_backbone's
        default (speedups.cache_pays)."""
        if dequant_cache == "auto":
            dequant_cache = cache_pays(self.peft)[0]
        if dequant_cache != self.dequant_cache:
            cache_dequantized_weights(self.peft, enable=dequant_cache)
            self.dequant_cache = dequant_cache
        for model in self.memory_models():
            model.memory_config.uncheckpointed_segments = uncheckpointed
            model.memory_config.checkpoint_policy = policy
        use_gpt_neo_sdpa(self.peft, enable=attention == "sdpa")
        use_fused_gelu(self.peft, enable=fused_gelu)
        self.autocast, self.forward_only = autocast, forward_only
        key = (compile, compile_scope, dynamic, memory_budget)
        if key != self.compiled:
            compile_body(self.peft, enable=False)
            compile_blocks(self.peft, enable=False)
            # static shapes, as a process training one model compiles them: the models here share
            # the blocks' compiled code at different lengths (ours: segment + 2 x memory, the
            # associative memory: segment + memory), and torch would make the second model's graphs
            # dynamic in the length (automatic dynamic shapes), with symbolic sizes in every call
            kwargs = {"dynamic": dynamic, "memory_budget": memory_budget,
                      **({"mode": compile} if isinstance(compile, str) else {})}
            if compile and compile_scope == "body":
                compile_body(self.peft, **kwargs)
            elif compile:
                compile_blocks(self.peft, **kwargs)
            self.compiled = key
        for model in self.memory_models():
            model.memory_config.checkpoint_segments = checkpoint_segments
        lm = self.ours.causal_lm
        if checkpoint_layers:
            enable_checkpointing(lm, drop_input_hook=False)
        else:
            stop_checkpointing_layers(lm)

    def loss(self, impl: str, ids: torch.Tensor, batch: int, segments: int) -> torch.Tensor:
        if impl == "reference":
            return self.reference(ids)
        if impl == "ours":
            return self.ours(ids, labels=ids).loss
        if impl == "associative":
            return self.associative(ids, labels=ids).loss
        flat = ids.reshape(batch * segments, self.segment)  # the segments as independent sequences
        if impl == "independent-memory":  # each with the initial memory, no recurrence
            return self.ours(flat, labels=flat).loss
        return self.independent(flat, labels=flat).loss  # without memory tokens

    def run(self, impl: str, segments: int, batch: int, label: str) -> dict:
        self.memory_models(associative=impl == "associative")
        optimizer = self.optimizers[impl]
        ids = torch.randint(0, self.config.vocab_size, (batch, segments * self.segment), device=self.device)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.loss(impl, ids, batch, segments)
            if self.forward_only:
                return
            loss.backward()
            optimizer.step()

        result = measure(step, self.device, self.warmup, self.repeat)

        optimizer.zero_grad(set_to_none=True)
        free()
        tokens = batch * segments * self.segment
        row = {"backbone": self.quantization, "impl": label, "segments": segments, "batch": batch,
               "step_s": result.seconds, "tokens_per_s": tokens / result.seconds if not result.oom else None,
               "peak_gib": result.peak_gib, "oom": result.oom, "first_step_s": result.first_s}
        if self.forward_only:
            row["forward_only"] = True
        if self.peak_tflops and not result.oom and not self.forward_only:  # training FLOPs only
            positions = self.segment + {"independent": 0, "associative": self.m}.get(impl, 2 * self.m)
            flops = train_flops_per_token(self.config, positions) * tokens
            row["mfu_pct"] = 100 * flops / result.seconds / 1e12 / self.peak_tflops
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        return row


FAST = dict(attention="sdpa", fused_gelu=True, autocast=True)
# (label, impl, set_levers keywords): each lever added on its own, then together
LEVERS = [
    ("reference loop, eager attention", "reference", dict(attention="eager")),
    ("reference loop, SDPA attention", "reference", dict(attention="sdpa")),
    ("ours, eager, no checkpointing", "ours", dict(attention="eager")),
    ("ours, SDPA, no checkpointing", "ours", dict(attention="sdpa")),
    ("ours, SDPA, fused GELU", "ours", dict(attention="sdpa", fused_gelu=True)),
    ("ours, SDPA, bf16 autocast", "ours", dict(attention="sdpa", autocast=True)),
    ("ours, SDPA, fused GELU, autocast", "ours", dict(attention="sdpa", fused_gelu=True, autocast=True)),
    ("ours, SDPA, segment checkpointing", "ours", dict(attention="sdpa", checkpoint_segments=True)),
    ("ours, SDPA, fused GELU, autocast, segment checkpointing", "ours",
     dict(attention="sdpa", fused_gelu=True, autocast=True, checkpoint_segments=True)),
    ("ours, SDPA, segment + layer checkpointing", "ours",
     dict(attention="sdpa", checkpoint_segments=True, checkpoint_layers=True)),
    ("independent segments, SDPA, no checkpointing", "independent", dict(attention="sdpa")),
    ("independent segments, SDPA, fused GELU, autocast", "independent",
     dict(attention="sdpa", fused_gelu=True, autocast=True)),
]
COMPILE_LEVERS = [
    ("ours, SDPA, fused GELU, autocast, compiled blocks", "ours", dict(FAST, compile=True)),
    ("ours, SDPA, fused GELU, autocast, compiled blocks, segment checkpointing", "ours",
     dict(FAST, compile=True, checkpoint_segments=True)),
]


def levers(bench: Bench, segments: int, batch: int, table=None) -> list[dict]:
    rows = []
    for label, impl, settings in table or LEVERS:
        try:
            bench.set_levers(**settings)
            rows.append(bench.run(impl, segments, batch, label))
        except Exception as err:  # a lever that does not run here is a result too
            print(f"{label}: failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
            rows.append({"impl": label, "error": f"{type(err).__name__}: {str(err)[:200]}"})
    bench.set_levers("sdpa")
    return rows


def lm_head_layouts(device: torch.device, vocab: int, hidden: int, rows: int, repeat: int = 20) -> list[dict]:
    """logits = h W^T (the usual layout: an odd vocabulary gives an unaligned output row, which
    keeps cuBLAS off its fast kernels) against (W h^T)^T (the vocabulary becomes the unaligned
    M dimension, which is harmless); forward + backward + float cross-entropy of one chunk."""
    import torch.nn.functional as F

    from .common import measure

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weight = torch.randn(vocab, hidden, device=device, dtype=dtype) * 0.02
    hidden_states = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), device=device)
    out = []
    for label, logits_of in (("F.linear(h, W)", lambda h: F.linear(h, weight)),
                             ("(W @ h.T).T", lambda h: (weight @ h.t()).t())):
        def step():
            loss = F.cross_entropy(logits_of(hidden_states).float(), targets)
            loss.backward()
        m = measure(step, device, warmup=3, repeat=repeat)
        out.append({"layout": label, "vocab": vocab, "rows": rows, "ms": 1e3 * m.seconds})
        print(out[-1], flush=True)
    return out


def profiled_step(bench: Bench, impl: str, segments: int, batch: int, label: str, cpu: bool = False):
    """One step of ``impl`` under the profiler (after ``bench.run``'s warm-up steps had their
    turn): (its row, the profile's ``key_averages()``). ``cpu``: record host ops too."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = ([ProfilerActivity.CPU] if cpu or bench.device.type != "cuda" else []) + \
        ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    warmup, repeat = bench.warmup, bench.repeat
    bench.warmup, bench.repeat = 0, 1
    try:
        with torch_profile(activities=activities) as prof:
            row = bench.run(impl, segments, batch, f"{label} (profiled)")
    finally:
        bench.warmup, bench.repeat = warmup, repeat
    return row, prof.key_averages()


def profile(bench: Bench, runs: list[str]) -> list[dict]:
    """Where one step's time goes, for each IMPL:SEGMENTSxBATCH run: GPU kernel time (by kind)
    against the step's wall time (the rest is the GPU waiting on Python, launches or host syncs)
    and the top kernels."""
    rows = []
    for run in runs:
        name, (segments, batch) = parse_run(run)
        impl, label, settings = SWEEP[name]
        bench.set_levers(**settings)
        bench.run(impl, segments, batch, f"{label} (warm-up for the profile)")
        row, events = profiled_step(bench, impl, segments, batch, label, cpu=True)
        kernels = kernel_seconds(events) if bench.device.type == "cuda" else {"kernel_s": None}
        kernel_s = kernels.get("kernel_s")
        rows.append({"impl": label, "segments": segments, "batch": batch, "step_s": row["step_s"], **kernels,
                     "gpu_busy_pct": 100 * kernel_s / row["step_s"] if kernel_s else None})
        sort = "self_cuda_time_total" if bench.device.type == "cuda" else "self_cpu_time_total"
        print(f"\n### Profile: {label}, {segments} segments x batch {batch}")
        print(events.table(sort_by=sort, row_limit=15, max_name_column_width=60))
    return rows


def parse_run(run: str) -> tuple[str, tuple[int, int]]:
    """IMPL:SEGMENTSxBATCH -> (IMPL, (segments, batch))."""
    name, shape = run.split(":")
    segments, batch = (int(v) for v in shape.split("x"))
    return name, (segments, batch)


FLAT_FAST = [  # (name suffix, label, set_levers keywords) on top of compiled segment checkpointing
    ("keep1", "last segment kept", dict(uncheckpointed=1)),
    ("keep2", "last 2 segments kept", dict(uncheckpointed=2)),
    ("sac", "selective: matmul outputs saved, last segment kept", dict(uncheckpointed=1, policy="save_matmuls")),
    ("cache", "dequantized-weight cache, last segment kept", dict(uncheckpointed=1, dequant_cache=True)),
    ("cache-keep2", "dequantized-weight cache, last 2 segments kept", dict(uncheckpointed=2, dequant_cache=True)),
    ("cache-sac", "dequantized-weight cache, selective, last segment kept",
     dict(uncheckpointed=1, policy="save_matmuls", dequant_cache=True)),
]
SWEEP = {"reference": ("reference", "reference loop (eager, no checkpointing)", dict(attention="eager")),
         "ours": ("ours", "ours (SDPA, fused GELU, autocast, segment checkpointing)",
                  dict(FAST, checkpoint_segments=True)),
         "ours-nockpt": ("ours", "ours (SDPA, fused GELU, autocast, no checkpointing)", FAST),
         "ours-compiled": ("ours", "ours (SDPA, fused GELU, autocast, compiled blocks, segment checkpointing)",
                           dict(FAST, compile=True, checkpoint_segments=True)),
         "ours-compiled-nockpt": ("ours", "ours (SDPA, fused GELU, autocast, compiled blocks, no checkpointing)",
                                  dict(FAST, compile=True)),
         "independent": ("independent", "independent segments (SDPA, fused GELU, autocast, no checkpointing)",
                         FAST),
         "independent-compiled": ("independent", "independent segments (SDPA, fused GELU, autocast, compiled "
                                  "blocks, no checkpointing)", dict(FAST, compile=True)),
         "independent-memory": ("independent-memory", "independent segments with memory tokens (SDPA, fused GELU, "
                                "autocast, no checkpointing)", FAST),
         "independent-memory-compiled": ("independent-memory", "independent segments with memory tokens (SDPA, "
                                         "fused GELU, autocast, compiled blocks, no checkpointing)",
                                         dict(FAST, compile=True)),
         "independent-memory-graphs": ("independent-memory", "independent segments with memory tokens (SDPA, "
                                       "fused GELU, autocast, compiled blocks + CUDA graphs, no checkpointing)",
                                       dict(FAST, compile="reduce-overhead")),
         "ours-graphs-nockpt": ("ours", "ours (SDPA, fused GELU, autocast, compiled blocks + CUDA graphs, "
                                "no checkpointing)", dict(FAST, compile="reduce-overhead")),
         "independent-graphs": ("independent", "independent segments (SDPA, fused GELU, autocast, compiled "
                                "blocks + CUDA graphs, no checkpointing)", dict(FAST, compile="reduce-overhead")),
         # Fast by default: what RMTModel.from_backbone gives with no switch (SDPA, fused GELU, the
         # padded head; no autocast), with compile=True (the README example) and without it.
         "ours-default": ("ours", "ours as from_backbone builds it (SDPA, fused GELU, padded head, NF4 weight "
                          "cache where it pays; no autocast, no checkpointing)",
                          dict(attention="sdpa", fused_gelu=True, dequant_cache="auto")),
         "ours-default-compiled": ("ours", "ours as from_backbone(compile=True) builds it (the README example; no "
                                   "autocast, no checkpointing)",
                                   dict(attention="sdpa", fused_gelu=True, compile=True, dequant_cache="auto")),
         "ours-default-compiled-nocache": ("ours", "the README example with cache_dequantized=False (no autocast, "
                                           "no checkpointing)", dict(attention="sdpa", fused_gelu=True, compile=True)),
         # Flat and fast: segment checkpointing that recomputes less (all compiled, autocast).
         **{f"ours-compiled-{key}": ("ours", f"ours (compiled blocks, segment checkpointing, {label})",
                                     dict(FAST, compile=True, checkpoint_segments=True, **levers))
            for key, label, levers in FLAT_FAST},
         # the associative memory (ARMT) in the settings of the rows above, for the ratio to ours
         "associative-default-compiled": ("associative", "associative memory as from_backbone(compile=True) builds "
                                          "it (no autocast, no checkpointing)",
                                          dict(attention="sdpa", fused_gelu=True, compile=True, dequant_cache="auto")),
         "associative-compiled-nockpt": ("associative", "associative memory (SDPA, fused GELU, autocast, compiled "
                                         "blocks, no checkpointing)", dict(FAST, compile=True)),
         "associative-graphs-nockpt": ("associative", "associative memory (SDPA, fused GELU, autocast, compiled "
                                       "blocks + CUDA graphs, no checkpointing)", dict(FAST, compile="reduce-overhead")),
         # the decoder body compiled whole: one compiled call (and one CUDA graph) a segment, not a layer
         **{f"{impl}-body-{key}": (impl, f"{name} (SDPA, fused GELU, autocast, compiled body{graphs}, no checkpointing)",
                                   dict(FAST, compile=mode, compile_scope="body"))
            for impl, name in (("ours", "ours"), ("associative", "associative memory"))
            for key, graphs, mode in (("compiled-nockpt", "", True), ("graphs-nockpt", " + CUDA graphs", "reduce-overhead"))},
         # every size symbolic: what dynamic shapes cost each memory (see set_levers)
         **{f"{impl}-compiled-dynamic-nockpt": (impl, f"{name} (SDPA, fused GELU, autocast, compiled blocks with dynamic "
                                                f"shapes, no checkpointing)", dict(FAST, compile=True, dynamic=True))
            for impl, name in (("ours", "ours"), ("associative", "associative memory"))},
         "associative-compiled": ("associative", "associative memory (SDPA, fused GELU, autocast, compiled blocks, "
                                  "segment checkpointing)", dict(FAST, compile=True, checkpoint_segments=True)),
         "ours-compiled-cache-nockpt": ("ours", "ours (compiled blocks, no checkpointing, dequantized-weight cache)",
                                        dict(FAST, compile=True, dequant_cache=True)),
         # its forward alone: the cost that recomputing a checkpointed segment adds (the bound of flat and fast)
         "ours-compiled-cache-forward": ("ours", "ours (compiled blocks, dequantized-weight cache): the forward "
                                         "alone, gradients on", dict(FAST, compile=True, dequant_cache=True,
                                                                     forward_only=True))}


def planned(bench: Bench, runs: list[str], saved=lambda rows: None) -> list[dict]:
    """Exact runs, each IMPL:SEGMENTSxBATCH (e.g. reference:16x1 ours-compiled:32x8); ``saved(rows)``
    after each, so a run cut short keeps what it measured. A run that fails is a row with its error."""
    rows = []
    for run in runs:
        name, (segments, batch) = parse_run(run)
        impl, label, settings = SWEEP[name]
        try:
            bench.set_levers(**settings)
            rows.append(bench.run(impl, segments, batch, label))
        except Exception as err:  # e.g. a lever that torch cannot compile here: a result too
            print(f"{run}: failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
            rows.append({"impl": label, "segments": segments, "batch": batch, "oom": False,
                         "error": f"{type(err).__name__}: {str(err)[:300]}"})
            free()
        saved(rows)
    return rows


def sweep(bench: Bench, segment_counts: list[int], batches: list[int], max_tokens: int,
          impls: list[str]) -> list[dict]:
    rows = []
    for impl, label, settings in (SWEEP[name] for name in impls):
        bench.set_levers(**settings)
        for segments in segment_counts:
            for batch in batches:
                if batch * segments * bench.segment > max_tokens:
                    break
                row = bench.run(impl, segments, batch, label)
                rows.append(row)
                if row["oom"]:
                    break
    return rows


def best_by_segments(rows: list[dict]) -> list[dict]:
    """Per segment count: each implementation's best batch, and ours/reference."""
    table = {}
    for row in rows:
        if row["oom"] or "error" in row or row.get("forward_only"):  # not a training step
            continue
        if row["impl"].startswith(("independent", "associative")):
            continue
        if row["impl"].startswith("reference"):
            key = "ref"
        else:
            key = "nockpt" if "no checkpointing" in row["impl"] else "ours"
        entry = table.setdefault(row["segments"], {"segments": row["segments"]})
        if row["tokens_per_s"] > entry.get(f"{key}_tokens_per_s", 0):
            entry.update({f"{key}_batch": row["batch"], f"{key}_tokens_per_s": row["tokens_per_s"],
                          f"{key}_peak_gib": row["peak_gib"]})
    out = []
    for segments in sorted(table):
        entry = table[segments]
        for key in ("ours", "nockpt"):
            if "ref_tokens_per_s" in entry and f"{key}_tokens_per_s" in entry:
                entry[f"{key}_speed_ratio"] = entry[f"{key}_tokens_per_s"] / entry["ref_tokens_per_s"]
                if entry["ref_peak_gib"]:
                    entry[f"{key}_memory_ratio"] = entry[f"{key}_peak_gib"] / entry["ref_peak_gib"]
        out.append(entry)
    return out


def main(argv=None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--quantization", nargs="+", default=["4bit"],
                        choices=["none", "4bit", "8bit", *TORCH_HELD],
                        help="4bit / 8bit: bitsandbytes NF4 / LLM.int8; torch-4bit / torch-8bit / fp8: held by torch "
                             "(rmt_peft.quantized_linear)")
    parser.add_argument("--sections", nargs="+", default=["levers", "sweep"],
                        choices=["levers", "sweep", "profile", "compile", "lm_head"])
    parser.add_argument("--runs", nargs="+", help="instead of the sweep grid: IMPL:SEGMENTSxBATCH ...")
    parser.add_argument("--profile-runs", nargs="+", help="runs to profile, IMPL:SEGMENTSxBATCH ...")
    parser.add_argument("--sweep-impls", nargs="+", default=["reference", "ours"], choices=sorted(SWEEP))
    parser.add_argument("--segment-size", type=int, default=1024)
    parser.add_argument("--memory-tokens", type=int, default=10)
    parser.add_argument("--lever-shape", type=int, nargs=2, default=[4, 2], metavar=("SEGMENTS", "BATCH"))
    parser.add_argument("--segments", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=65536, help="largest batch x length tried")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    if args.tiny:
        args.segment_size, args.memory_tokens = min(args.segment_size, 32), min(args.memory_tokens, 4)
    device = device_of(args)
    # One process compiles the same block code for several models, shapes and modes; torch's
    # default limit (8 graphs per code object) would silently send the later runs to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    env = environment(device)
    env["bf16_matmul_tflops"] = bf16_matmul_tflops(device)
    print(env, flush=True)
    config = gpt_neo_config(args.tiny)
    tables = {}
    if "lm_head" in args.sections:
        rows = [r for n in (1024, 2048) for r in lm_head_layouts(device, config.vocab_size, config.hidden_size, n)]
        tables["lm_head"] = rows
        print_table("LM head layouts (forward + backward + CE of one chunk)", rows, ["layout", "vocab", "rows", "ms"])
    for quantization in args.quantization:
        q = None if quantization == "none" else quantization
        bench = Bench(config, q, device, args.segment_size, args.memory_tokens, env["bf16_matmul_tflops"],
                      args.warmup, args.repeat)
        name = bench.quantization
        if "levers" in args.sections:
            rows = levers(bench, *args.lever_shape)
            tables[f"levers_{name}"] = rows
            print_table(f"Levers, {name} backbone, {args.lever_shape[0]} segments x batch {args.lever_shape[1]}",
                        rows, ["impl", "step_s", "tokens_per_s", "peak_gib", "mfu_pct"])
        if "compile" in args.sections:
            rows = levers(bench, *args.lever_shape, table=COMPILE_LEVERS)
            tables[f"compile_{name}"] = rows
            print_table(f"Compiled blocks, {name} backbone, {args.lever_shape[0]} segments x batch "
                        f"{args.lever_shape[1]}", rows, ["impl", "step_s", "tokens_per_s", "peak_gib", "mfu_pct"])
        if "profile" in args.sections:
            shape = "x".join(map(str, args.lever_shape))
            rows = profile(bench, args.profile_runs or [f"ours-nockpt:{shape}", f"independent:{shape}"])
            tables[f"profile_{name}"] = rows
            print_table(f"GPU busy share of a step, {name} backbone", rows,
                        ["impl", "segments", "batch", "step_s", "kernel_s", "matmul_s", "attention_s", "gpu_busy_pct"])
        if "sweep" in args.sections:
            key = f"sweep_{name}"
            rows = planned(bench, args.runs, lambda rows: write_json(args.out, env, {**tables, key: rows})) \
                if args.runs else \
                sweep(bench, args.segments, args.batches, args.max_tokens, args.sweep_impls)
            tables[f"sweep_{name}"] = rows
            best = best_by_segments(rows)
            tables[f"best_{name}"] = best
            print_table(f"All runs, {name} backbone", rows,
                        ["impl", "segments", "batch", "tokens_per_s", "peak_gib", "mfu_pct"])
            print_table(f"Best batch per segment count, {name} backbone", best,
                        ["segments", "ref_batch", "ref_tokens_per_s", "ref_peak_gib", "ours_batch",
                         "ours_tokens_per_s", "ours_peak_gib", "ours_speed_ratio", "ours_memory_ratio",
                         "nockpt_batch", "nockpt_tokens_per_s", "nockpt_peak_gib", "nockpt_speed_ratio"])
        del bench
        free()
    write_json(args.out, env, tables)
    return tables


if __name__ == "__main__":
    main()
