"""A captured stream that computes the loss, against the same stream run eagerly.

A stream that only reads runs no LM head, so the stream benchmarks never put the int8 head of a
torch-held backbone (its compiled dequantization, ``quantized_linear.dequantize_scaled``) inside
a CUDA graph. Here each backbone's stream computes the loss three times: ``cuda_graph=False``,
then twice with the default (graphs from segment 17 on a GPU). Reported: whether it captured,
the largest difference of a segment's loss and of the final memory against the eager stream, and
the seconds of each stream (the first includes compiling). GPT-Neo-1.3B's widths and vocabulary,
``--layers`` of its blocks (the head is what is checked), LoRA r16, 10 memory tokens.

    python -m benchmarks.graph_loss --out graph_loss.json
"""
from __future__ import annotations

import time

import torch

from rmt_peft.memory import MemoryConfig
from rmt_peft.recurrent import RMTModel
from rmt_peft.speedups import compile_blocks

from .common import (base_parser, build_backbone, device_of, environment, free, gpt_neo_config, lora_config,
                     print_table, sync, write_json)


def config_of(args):
    config = gpt_neo_config(args.tiny)
    if not args.tiny:
        config.num_layers = args.layers
        config.attention_types = [[["global", "local"], args.layers // 2]]
        config.attention_layers = ["global", "local"] * (args.layers // 2)
    return config


def stream_loss(rmt: RMTModel, ids: torch.Tensor, chunk: int, cuda_graph: bool | None):
    """(seconds, the stream's result, whether it replayed a CUDA graph)."""
    sync(ids.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        reader = rmt.stream(compute_loss=True, cuda_graph=cuda_graph)
        for start in range(0, ids.shape[1], chunk):
            reader.feed(ids[:, start:start + chunk])
        result = reader.finish()
    sync(ids.device)
    return time.perf_counter() - t0, result, reader._graph is not None


def check(name: str, compiled: bool, config, ids: torch.Tensor, args) -> dict:
    torch.manual_seed(0)
    rmt = RMTModel.from_backbone(build_backbone(config, None if name == "bf16" else name, ids.device),
                                 MemoryConfig(num_memory_tokens=args.memory_tokens, segment_size=args.segment_size),
                                 lora=lora_config(), verbose=False).eval()
    if compiled:
        compile_blocks(rmt.causal_lm, dynamic=False)
    t_eager, eager, _ = stream_loss(rmt, ids, args.chunk, False)
    t_graph, graph, captured = stream_loss(rmt, ids, args.chunk, None)
    t_again, again, _ = stream_loss(rmt, ids, args.chunk, None)
    diffs = [abs(a - b) for a, b in zip(eager.segment_losses, graph.segment_losses)]
    row = {"backbone": name, "compiled": compiled, "captured": captured, "segments": len(diffs),
           "loss_eager": eager.loss, "loss_graph": graph.loss, "loss_graph_again": again.loss,
           "segment_loss_max_abs_diff": max(diffs),
           "memory_max_abs_diff": float((eager.memory.float() - graph.memory.float()).abs().max()),
           "s_eager_first": t_eager, "s_graph": t_graph, "s_graph_again": t_again}
    del rmt
    free()
    return row


def main(argv=None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["fp8"], choices=["bf16", "fp8", "torch-8bit", "torch-4bit"])
    parser.add_argument("--compiled", nargs="+", default=["no", "yes"], choices=["no", "yes"],
                        help="compiled blocks (static shapes, as the stream benchmarks)")
    parser.add_argument("--layers", type=int, default=4, help="GPT-Neo-1.3B blocks kept (even)")
    parser.add_argument("--segments", type=int, default=24, help="past 17, so that some are replayed")
    parser.add_argument("--segment-size", type=int, default=1024)
    parser.add_argument("--memory-tokens", type=int, default=10)
    parser.add_argument("--chunk", type=int, default=4096)
    args = parser.parse_args(argv)
    if args.layers < 2 or args.layers % 2:
        parser.error(f"--layers: an even number >= 2 (GPT-Neo's blocks alternate global and local attention), "
                     f"got {args.layers}")
    if args.tiny:
        args.segment_size, args.chunk = 32, 128
    device = device_of(args)
    config = config_of(args)
    ids = torch.randint(0, config.vocab_size, (1, args.segments * args.segment_size),
                        generator=torch.Generator().manual_seed(3)).to(device)
    rows = [check(name, compiled == "yes", config, ids, args) for name in args.backbones for compiled in args.compiled]
    print_table("a stream computing the loss: captured against eager", rows,
                ["backbone", "compiled", "captured", "segment_loss_max_abs_diff", "memory_max_abs_diff", "s_graph_again"])
    tables = {"graph_loss": rows}
    write_json(args.out, environment(device), tables)
    return tables


if __name__ == "__main__":
    main()
