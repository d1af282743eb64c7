"""RMT against full attention on a RoPE backbone: time and memory at 8k, 32k, 128k tokens.

A ~1.1B Llama-style model (TinyLlama-1.1B's shape, random weights, bf16, torch SDPA / flash),
LoRA r=16 on all linear layers, batch 1.
- full attention: the whole input as one segment, no memory (RMTModel with 0 memory tokens, so
  the loss is the same chunked loss), layer checkpointing on for training so long inputs fit;
- RMT: segments of ``--segment-size`` with 10 memory tokens, segment checkpointing.
"train" is one forward + backward + AdamW step with the LM loss at every position; "infer"
reads the input without gradients (the memory after the last segment; for full attention the
last hidden states).

    python -m benchmarks.vs_full_attention --lengths 8192 32768 131072 --out vs_full.json
"""
from __future__ import annotations

import torch

from rmt_peft.backbones import enable_checkpointing
from rmt_peft.memory import MemoryConfig
from rmt_peft.recurrent import RMTModel

from .common import (base_parser, bf16_matmul_tflops, build_backbone, device_of, environment,
                     forward_flops_per_token, free, llama_config, lora_config, measure, optimizer_for,
                     print_table, stop_checkpointing_layers, train_flops_per_token, write_json)


def main(argv=None) -> list[dict]:
    from peft import get_peft_model

    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--segment-size", type=int, default=2048)
    parser.add_argument("--memory-tokens", type=int, default=10)
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    args = parser.parse_args(argv)
    if args.tiny:
        args.lengths, args.segment_size, args.memory_tokens = [128, 256], 64, 4
    device = device_of(args)
    env = environment(device)
    env["bf16_matmul_tflops"] = peak = bf16_matmul_tflops(device)
    print(env, flush=True)
    config = llama_config(args.tiny)
    peft_model = get_peft_model(build_backbone(config, None, device, attention="sdpa"), lora_config())
    lm = peft_model.get_base_model()
    rows = []
    for length in args.lengths:
        ids = torch.randint(0, config.vocab_size, (1, length), device=device)
        models = {
            "full attention": RMTModel(peft_model, MemoryConfig(num_memory_tokens=0, segment_size=length)),
            "RMT": RMTModel(peft_model, MemoryConfig(num_memory_tokens=args.memory_tokens,
                                                     segment_size=args.segment_size, checkpoint_segments=True)),
        }
        for mode in args.modes:
            for name, model in models.items():
                positions = length if name == "full attention" else args.segment_size + 2 * args.memory_tokens
                if mode == "train":
                    model.train()
                    if name == "full attention":
                        enable_checkpointing(lm, drop_input_hook=False)
                    else:
                        stop_checkpointing_layers(lm)
                    optimizer = optimizer_for(model)

                    def step(model=model, optimizer=optimizer):
                        optimizer.zero_grad(set_to_none=True)
                        model(ids, labels=ids).loss.backward()
                        optimizer.step()
                    flops = train_flops_per_token(config, positions)
                else:
                    model.eval()

                    def step(model=model):
                        with torch.no_grad():
                            model(ids, return_logits=False)
                    flops = forward_flops_per_token(config, positions)
                # long inputs take seconds a step: one warm-up (the first length) and one timed run
                result = measure(step, device, warmup=1 if length == args.lengths[0] else 0, repeat=1)
                row = {"mode": mode, "tokens": length, "model": name, "seconds": result.seconds,
                       "peak_gib": result.peak_gib, "oom": result.oom}
                if peak and not result.oom:
                    row["mfu_pct"] = 100 * flops * length / result.seconds / 1e12 / peak
                rows.append(row)
                print(row, flush=True)
                if mode == "train":
                    optimizer.zero_grad(set_to_none=True)
                    del optimizer
                free()
    stop_checkpointing_layers(lm)
    by_key = {(r["mode"], r["tokens"], r["model"]): r for r in rows}
    summary = []
    for (mode, tokens, model), row in by_key.items():
        if model != "RMT":
            continue
        full = by_key.get((mode, tokens, "full attention"))
        entry = {"mode": mode, "tokens": tokens, "rmt_s": row["seconds"], "full_s": full["seconds"],
                 "rmt_peak_gib": row["peak_gib"], "full_peak_gib": full["peak_gib"],
                 "rmt_mfu_pct": row.get("mfu_pct"), "full_mfu_pct": full.get("mfu_pct")}
        if not full["oom"] and not row["oom"]:
            entry["time_full_over_rmt"] = full["seconds"] / row["seconds"]
        if full["peak_gib"] and row["peak_gib"]:
            entry["memory_full_over_rmt"] = full["peak_gib"] / row["peak_gib"]
        summary.append(entry)
    print_table(f"RMT (segments of {args.segment_size}, {args.memory_tokens} memory tokens) vs full attention, "
                "Llama-1.1B shape, bf16 + LoRA, batch 1", summary,
                ["mode", "tokens", "rmt_s", "full_s", "time_full_over_rmt", "rmt_peak_gib", "full_peak_gib",
                 "memory_full_over_rmt", "rmt_mfu_pct", "full_mfu_pct"])
    write_json(args.out, env, {"runs": rows, "summary": summary})
    return summary


if __name__ == "__main__":
    main()
