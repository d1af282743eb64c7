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
                     forward_flops_per_token, free, gpt_neo_config, lora_config, print_table, sync, write_json)


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


def stream_all(rmt: RMTModel, ids: torch.Tensor, chunk: int):
    reader = rmt.stream(batch_size=ids.shape[0])
    for start in range(0, ids.shape[1], chunk):
        reader.feed(ids[:, start:start + chunk])
    return reader.finish()


@torch.no_grad()
def segment_loop(rmt: RMTModel, ids: torch.Tensor):
    size, memory = rmt.memory_config.segment_size, rmt.initial_memory(ids.shape[0])
    for start in range(0, ids.shape[1], size):
        memory = rmt._segment(memory, ids[:, start:start + size], None, None, False)[0]
    return memory


def main(argv=None) -> list[dict]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="none", choices=["none", "4bit", "8bit"])
    parser.add_argument("--tokens", type=int, default=2_048_000)
    parser.add_argument("--segment-size", type=int, default=1024)
    parser.add_argument("--memory-tokens", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--attached-tokens", type=int, default=512_000,
                        help="tokens streamed with LoRA attached (slower: launch-bound), before merging")
    parser.add_argument("--compile", choices=["none", "blocks"], default="none",
                        help="compiled blocks (CUDA-graph modes serve training only, see compile_blocks)")
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
    backbone = build_backbone(config, q, device, attention="sdpa")
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=args.memory_tokens,
                                                        segment_size=args.segment_size), lora=lora_config(),
                                 verbose=False)
    rmt.eval()
    if args.compile == "blocks":
        compile_blocks(rmt.causal_lm)
    suffix = ", compiled blocks" if args.compile == "blocks" else ""
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens), device=device)
    flops = forward_flops_per_token(config, args.segment_size + 2 * args.memory_tokens)
    rows = []

    def record(label, tokens, seconds, peak_gib, one_segment_gib):
        row = {"run": label, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
               "peak_gib": peak_gib}
        if peak_gib and one_segment_gib:
            row["peak_vs_one_segment"] = peak_gib / one_segment_gib
        if peak:
            row["mfu_pct"] = 100 * flops * tokens / seconds / 1e12 / peak
        rows.append(row)
        print(row, flush=True)
        return row

    for lora_state in ("LoRA attached", "LoRA merged"):
        tokens = args.tokens
        if lora_state == "LoRA merged":
            rmt.backbone = rmt.backbone.merge_and_unload()
        else:
            tokens = min(tokens, args.attached_tokens)
        stream_all(rmt, ids[:, :4 * args.segment_size], args.chunk)  # warm-up
        # Exactly one segment: a different length would be a new shape for compiled blocks.
        _, one = timed(lambda: stream_all(rmt, ids[:, :args.segment_size], args.chunk), device)
        half = tokens // 2
        s_half, p_half = timed(lambda: stream_all(rmt, ids[:, :half], args.chunk), device)
        record(f"stream, {lora_state}{suffix}", half, s_half, p_half, one)
        s_all, p_all = timed(lambda: stream_all(rmt, ids[:, :tokens], args.chunk), device)
        row = record(f"stream, {lora_state}{suffix}", tokens, s_all, p_all, one)
        row["time_ratio_2x_tokens"] = s_all / s_half
        if lora_state == "LoRA merged":
            s_loop, p_loop = timed(lambda: segment_loop(rmt, ids), device)
            record(f"segment loop (floor), {lora_state}{suffix}", tokens, s_loop, p_loop, one)
    print_table(f"Streaming {args.tokens} tokens, {q or 'bf16'} GPT-Neo-1.3B shape, segments of "
                f"{args.segment_size}, chunks of {args.chunk}", rows,
                ["run", "tokens", "seconds", "tokens_per_s", "peak_gib", "peak_vs_one_segment",
                 "time_ratio_2x_tokens", "mfu_pct"])
    write_json(args.out, env, {"stream": rows})
    return rows


if __name__ == "__main__":
    main()
