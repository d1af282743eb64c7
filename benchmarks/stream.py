"""Streaming inference: millions of tokens through ``rmt.stream`` in constant memory.

GPT-Neo-1.3B shape (bf16 by default), LoRA r=16 on all linear layers (attached, and merged into
the weights as one would deploy), 10 memory tokens, segments of 1024. Tokens arrive in chunks of
``--chunk``. Reported: time for half and all of ``--tokens`` (linearity), tokens/s, forward MFU,
and peak memory against reading a single segment. "segment loop" is the floor: the same segment
calls back to back with no stream bookkeeping.

    python -m benchmarks.stream --tokens 2048000 --out stream.json
"""
from __future__ import annotations

import time

import torch

from rmt_peft.memory import MemoryConfig
from rmt_peft.recurrent import RMTModel
from rmt_peft.speedups import compile_blocks

from .common import (GIB, base_parser, bf16_matmul_tflops, build_backbone, device_of, environment,
                     forward_flops_per_token, free, gpt_neo_config, kernel_kind, lora_config, print_table, sync,
                     write_json)


# LoRA attached as peft computes it; attached with the stream's merged copies (its default on a
# GPU: rmt.stream(merge_lora=None)); merged into the weights (merge_and_unload)
LORA_STATES = {"attached": ("LoRA attached", False), "copies": ("LoRA attached, merged copies", True),
               "merged": ("LoRA merged", False)}


def timed(fn, device) -> tuple[float, float | None]:
    free()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return seconds, peak


def stream_all(rmt: RMTModel, ids: torch.Tensor, chunk: int, cuda_graph: bool = False, merge_lora: bool = False):
    reader = rmt.stream(batch_size=ids.shape[0], cuda_graph=cuda_graph, merge_lora=merge_lora)
    for start in range(0, ids.shape[1], chunk):
        reader.feed(ids[:, start:start + chunk])
    return reader.finish()


@torch.no_grad()
def segment_loop(rmt: RMTModel, ids: torch.Tensor):
    size, memory = rmt.memory_config.segment_size, rmt.initial_memory(ids.shape[0])
    for start in range(0, ids.shape[1], size):
        memory = rmt._segment(memory, ids[:, start:start + size], None, None, False)[0]
    return memory


@torch.no_grad()
def kernel_split(rmt: RMTModel, ids: torch.Tensor, segments: int = 5) -> dict:
    """GPU kernel time of one segment (eager), by kind, and its wall time: where a streamed
    segment's time goes. Without profiler overhead for the wall time (timed apart)."""
    from torch.profiler import ProfilerActivity, profile

    size = rmt.memory_config.segment_size
    memory, seg = rmt.initial_memory(ids.shape[0]), ids[:, :size]
    for _ in range(3):
        rmt._segment(memory, seg, None, None, False)
    seconds, _ = timed(lambda: [rmt._segment(memory, seg, None, None, False) for _ in range(segments)], ids.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(segments):
            rmt._segment(memory, seg, None, None, False)
        sync(ids.device)
    split = {"wall_ms": 1e3 * seconds / segments}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            key = f"{kernel_kind(event.key)}_ms"
            split[key] = split.get(key, 0.0) + event.self_device_time_total / 1e3 / segments
    return split


def memory_difference(a, b) -> float:
    """Largest absolute difference of two memory states (token memories or associative states)."""
    flat = (lambda m: m.tensors()) if hasattr(a, "tensors") else (lambda m: (m,))
    return max(float((x - y).abs().max()) for x, y in zip(flat(a), flat(b)))


def stream_memory_kind(args, kind: str, config, q, device, ids, env, peak, rows: list[dict]) -> None:
    """Every LoRA state and graph setting of ``args`` for one memory kind, on a backbone of its own
    (the merged state replaces it); rows appended to ``rows``."""
    backbone = build_backbone(config, q, device, attention="sdpa")
    memory = MemoryConfig(num_memory_tokens=args.memory_tokens, segment_size=args.segment_size, memory_kind=kind)
    rmt = RMTModel.from_backbone(backbone, memory, lora=lora_config(), verbose=False)
    rmt.eval()
    if args.compile == "blocks":
        compile_blocks(rmt.causal_lm)
    suffix = ", compiled blocks" if args.compile == "blocks" else ""
    prefix = "associative memory, " if kind == "associative" else ""
    flops = forward_flops_per_token(config, memory.positions_per_segment)

    def record(label, tokens, seconds, peak_gib, one_segment_gib):
        row = {"run": label, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
               "peak_gib": peak_gib}
        if peak_gib and one_segment_gib:
            row["peak_vs_one_segment"] = peak_gib / one_segment_gib
        if peak:
            row["mfu_pct"] = 100 * flops * tokens / seconds / 1e12 / peak
        rows.append(row)
        print(row, flush=True)
        write_json(args.out, env, {"stream": rows})  # after every row: a run cut short keeps them
        return row

    graphs = {"off": [False], "on": [True], "both": [False, True]}[args.cuda_graph]
    one = None
    states = {label: merge for name, (label, merge) in LORA_STATES.items() if name in args.lora}
    for lora_state, merge_lora in states.items():
        if lora_state == "LoRA merged":
            rmt.backbone = rmt.backbone.merge_and_unload()
        eager_memory = None
        for graph in graphs:
            # LoRA attached without graphs is launch-bound (slow): fewer tokens
            tokens = min(args.tokens, args.attached_tokens) if lora_state == "LoRA attached" and not graph \
                else args.tokens
            label = f"stream, {prefix}{lora_state}{suffix}{', CUDA graph' if graph else ''}"
            try:
                check = ids[:, :16 * args.segment_size + 1]  # 16 full segments (a last short one runs eagerly)
                memory = stream_all(rmt, check, args.chunk, graph, merge_lora).memory  # also the warm-up
                if eager_memory is None or not graph:
                    eager_memory = memory if not graph else stream_all(rmt, check, args.chunk, False, merge_lora).memory
                # Exactly one segment: a different length would be a new shape for compiled blocks.
                _, one = timed(lambda: stream_all(rmt, ids[:, :args.segment_size], args.chunk, graph, merge_lora),
                               device)
                half = tokens // 2
                s_half, p_half = timed(lambda: stream_all(rmt, ids[:, :half], args.chunk, graph, merge_lora), device)
                record(label, half, s_half, p_half, one)
                s_all, p_all = timed(lambda: stream_all(rmt, ids[:, :tokens], args.chunk, graph, merge_lora), device)
                row = record(label, tokens, s_all, p_all, one)
                row["time_ratio_2x_tokens"] = s_all / s_half
                # the graph replays the eager kernels: the memory after 16 segments must not move
                row["memory_max_abs_diff_vs_eager"] = memory_difference(memory, eager_memory)
            except Exception as err:  # e.g. a capture torch refuses: a result too, the other runs go on
                rows.append({"run": label, "error": f"{type(err).__name__}: {str(err)[:300]}"})
                print(rows[-1], flush=True)
                free()
        if lora_state == "LoRA merged" and not args.no_floor:
            s_loop, p_loop = timed(lambda: segment_loop(rmt, ids), device)
            record(f"segment loop (floor), {prefix}{lora_state}{suffix}", args.tokens, s_loop, p_loop, one)
    if args.profile and device.type == "cuda":
        with rmt._stream_view(states[lora_state]):  # the last state, as it streamed
            split = kernel_split(rmt, ids)
        rows.append({"run": f"one segment, kernel time by kind, {prefix}{lora_state}{suffix}", **split})
        print(rows[-1], flush=True)



def main(argv=None) -> list[dict]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"])
    parser.add_argument("--tokens", type=int, default=2_048_000)
    parser.add_argument("--segment-size", type=int, default=1024)
    parser.add_argument("--memory-tokens", type=int, default=10)
    parser.add_argument("--memory-kind", nargs="+", choices=["tokens", "associative"], default=["tokens"],
                        help="stream each memory kind (each on a backbone of its own), in this order")
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--attached-tokens", type=int, default=512_000,
                        help="tokens streamed with LoRA attached (slower: launch-bound), before merging")
    parser.add_argument("--compile", choices=["none", "blocks"], default="none",
                        help="compiled blocks (CUDA-graph modes serve training only, see compile_blocks)")
    parser.add_argument("--cuda-graph", choices=["off", "on", "both"], default="off",
                        help="rmt.stream(cuda_graph=True): each segment replayed as a CUDA graph (GPU only); "
                             "'both' measures with and without, side by side")
    parser.add_argument("--no-floor", action="store_true", help="skip the segment-loop floor")
    parser.add_argument("--profile", action="store_true",
                        help="GPU kernel time of one segment by kind (matmul, attention, other), last LoRA state")
    parser.add_argument("--lora", nargs="+", choices=list(LORA_STATES), default=list(LORA_STATES),
                        help="which LoRA states to stream (always in this order: merging is for good)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.tokens, args.chunk = min(args.tokens, 2048), min(args.chunk, 100)
        args.segment_size, args.memory_tokens = 32, 4
    device = device_of(args)
    env = environment(device)
    env["bf16_matmul_tflops"] = peak = bf16_matmul_tflops(device)
    print(env, flush=True)
    config = gpt_neo_config(args.tiny)
    q = None if args.quantization == "none" else args.quantization
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens), device=device)
    rows = []
    for kind in args.memory_kind:
        stream_memory_kind(args, kind, config, q, device, ids, env, peak, rows)
        free()

    def switches(run: str) -> str:  # the label without its LoRA state
        for state in sorted((label for label, _ in LORA_STATES.values()), key=len, reverse=True):
            run = run.replace(state, "")
        return run

    merged = {switches(r["run"]): r for r in rows if r["run"].startswith("stream, LoRA merged")}
    for row in rows:  # LoRA attached against merged with the same switches: time per token (target <= 1.3)
        twin = merged.get(switches(row["run"]))
        if "attached" in row["run"] and twin and "tokens_per_s" in row and "tokens_per_s" in twin:
            row["time_vs_merged"] = twin["tokens_per_s"] / row["tokens_per_s"]
    print_table(f"Streaming {args.tokens} tokens, {q or 'bf16'} GPT-Neo-1.3B shape, segments of "
                f"{args.segment_size}, chunks of {args.chunk}", rows,
                ["run", "tokens", "seconds", "tokens_per_s", "peak_gib", "peak_vs_one_segment",
                 "time_ratio_2x_tokens", "time_vs_merged", "memory_max_abs_diff_vs_eager", "mfu_pct", "wall_ms",
                 "matmul_ms", "attention_ms", "other_ms", "error"])
    write_json(args.out, env, {"stream": rows})
    return rows


if __name__ == "__main__":
    main()
