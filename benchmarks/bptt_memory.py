"""Peak memory of full BPTT over many long segments (the 8 GB-card target).

GPT-Neo-1.3B shape, NF4 + LoRA r=16 (all linear), 10 memory tokens, batch 1, segments of 2028
tokens (2028 + 2 x 10 memory positions fill GPT-Neo's 2048-position table), gradients through
every memory transition (no truncation). Peak GPU memory of one training step at 1 segment and
at ``--segments`` segments, with segment checkpointing alone and with layer checkpointing inside
the segment as well.

    python -m benchmarks.bptt_memory --segments 64 --out bptt.json
"""
from __future__ import annotations

import torch

from .common import (base_parser, bf16_matmul_tflops, device_of, environment, free, gpt_neo_config, print_table,
                     write_json)
from .train import Bench

SETTINGS = [  # (label, Bench.set_levers keywords); all with SDPA attention and segment checkpointing
    ("segment checkpointing", dict()),
    ("segment checkpointing, fused GELU, autocast", dict(fused_gelu=True, autocast=True)),
    ("segment + layer checkpointing", dict(checkpoint_layers=True)),
    ("segment + layer checkpointing, fused GELU, autocast", dict(checkpoint_layers=True, fused_gelu=True,
                                                                  autocast=True)),
    ("segment checkpointing, fused GELU, autocast, compiled blocks", dict(fused_gelu=True, autocast=True,
                                                                           compile=True)),
]


def main(argv=None) -> list[dict]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="4bit", choices=["none", "4bit", "8bit"])
    parser.add_argument("--segments", type=int, default=64)
    parser.add_argument("--segment-size", type=int, default=2028)
    parser.add_argument("--memory-tokens", type=int, default=10)
    parser.add_argument("--budget-gib", type=float, default=8.0)
    parser.add_argument("--settings", type=int, nargs="+", help="indices into SETTINGS (default: all)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.segment_size, args.memory_tokens = 32, 4
    device = device_of(args)
    env = environment(device)
    env["bf16_matmul_tflops"] = bf16_matmul_tflops(device)
    print(env, flush=True)
    q = None if args.quantization == "none" else args.quantization
    bench = Bench(gpt_neo_config(args.tiny), q, device, args.segment_size, args.memory_tokens,
                  env["bf16_matmul_tflops"], warmup=1, repeat=1)
    free()
    weights_gib = torch.cuda.memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    rows = []
    chosen = [SETTINGS[i] for i in args.settings] if args.settings else SETTINGS
    for label, settings in chosen:
        bench.set_levers("sdpa", checkpoint_segments=True, **settings)
        bench.warmup = 1
        one = bench.run("ours", 1, 1, label)
        bench.warmup = 0  # a long step: the 1-segment run above already warmed up
        many = bench.run("ours", args.segments, 1, label)
        row = {"setting": label, "weights_gib": weights_gib, "peak_1_gib": one["peak_gib"],
               f"peak_{args.segments}_gib": many["peak_gib"], "step_1_s": one["step_s"],
               f"step_{args.segments}_s": many["step_s"], "tokens_per_s": many["tokens_per_s"],
               "mfu_pct": many.get("mfu_pct")}
        if one["peak_gib"] and many["peak_gib"]:
            row["peak_ratio"] = many["peak_gib"] / one["peak_gib"]
            row["fits_budget"] = many["peak_gib"] <= args.budget_gib
        rows.append(row)
    print_table(f"BPTT over {args.segments} x {args.segment_size} tokens, batch 1, {bench.quantization} + LoRA",
                rows, ["setting", "weights_gib", "peak_1_gib", f"peak_{args.segments}_gib", "peak_ratio",
                       "fits_budget", "step_1_s", f"step_{args.segments}_s", "tokens_per_s", "mfu_pct"])
    write_json(args.out, env, {"bptt": rows})
    return rows


if __name__ == "__main__":
    main()
