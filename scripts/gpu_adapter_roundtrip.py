"""GPU evidence for frozen 4-bit / 8-bit / bf16 backbones with LoRA and adapters that travel.

Builds a GPT-Neo-1.3B-shaped model from its config with random weights (nothing is downloaded),
then per mode (bf16, 8bit, 4bit): loads it with ``load_backbone``, wraps it in an RMTModel with
LoRA, trains a few RMT steps, saves the adapter, reloads it with ``RMTModel.from_pretrained``
and compares the logits (and, with --merge, those of the merged bf16 model). Prints a markdown
table of peak GPU memory and step time per mode.

    python scripts/gpu_adapter_roundtrip.py                 # on the GPU, 1.3B shape
    python scripts/gpu_adapter_roundtrip.py --tiny          # CPU smoke test (hidden 64)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rmt_peft import MemoryConfig, RMTModel, load_backbone  # noqa: E402
from rmt_peft.tiny_models import tiny_config  # noqa: E402

MODES = {"bf16": None, "8bit": "8bit", "4bit": "4bit"}


def gpt_neo_1_3b_config():
    """EleutherAI/gpt-neo-1.3B's config values."""
    from transformers import GPTNeoConfig

    return GPTNeoConfig(vocab_size=50257, hidden_size=2048, num_layers=24, num_heads=16,
                        attention_types=[[["global", "local"], 12]], window_size=256,
                        max_position_embeddings=2048, intermediate_size=None, bos_token_id=50256,
                        eos_token_id=50256)


def build_base(path: str, tiny: bool, device: torch.device) -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_config("gpt_neo", hidden_size=64, num_layers=2, num_heads=4) if tiny else gpt_neo_1_3b_config()
    torch.manual_seed(0)
    with device:  # random init of 1.3B parameters is much faster on the GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_mode(mode: str, base: str, args, device: torch.device, workdir: str) -> dict:
    quantization = MODES[mode]
    device_map = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    backbone = load_backbone(base, quantization=quantization, dtype=args.dtype, device_map=device_map,
                             gradient_checkpointing=args.gradient_checkpointing)
    load_s = time.perf_counter() - t0
    memory_config = MemoryConfig(num_memory_tokens=args.memory_tokens, segment_size=args.segment_size,
                                 checkpoint_segments=not args.gradient_checkpointing)
    rmt = RMTModel.from_backbone(backbone, memory_config, lora={"target_modules": args.lora_preset, "r": args.r},
                                 verbose=False)
    trainable = sum(p.numel() for p in rmt.parameters() if p.requires_grad)
    vocab = rmt.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    length = args.segment_size * args.num_segments
    batches = [torch.randint(0, vocab, (args.batch_size, length), generator=generator).to(device)
               for _ in range(args.steps)]
    probe = torch.randint(0, vocab, (1, length), generator=generator).to(device)
    optimizer = torch.optim.AdamW([p for p in rmt.parameters() if p.requires_grad], lr=args.lr)

    rmt.train()
    times, losses = [], []
    for ids in batches:
        sync(device)
        t = time.perf_counter()
        loss = rmt(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    rmt.eval()
    with torch.no_grad():
        reference = rmt(probe).logits.float()
    folder = os.path.join(workdir, f"adapter-{mode}")
    rmt.save_pretrained(folder, base_model=base)
    adapter_mb = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) / 2**20
    merged_diff = float("nan")
    if args.merge:
        merged = rmt.merge_and_unload(device=device)
        with torch.no_grad():
            merged_diff = float((merged(probe).logits.float() - reference).abs().max())
        del merged
    del rmt, backbone, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    reloaded = RMTModel.from_pretrained(folder, quantization=quantization, dtype=args.dtype, device_map=device_map)
    with torch.no_grad():
        reload_diff = float((reloaded(probe).logits.float() - reference).abs().max())
    del reloaded
    gc.collect()
    steady = times[1:] or times
    label = mode if quantization else {"bfloat16": "bf16", "float32": "fp32"}[args.dtype]
    return {"mode": label, "load_s": load_s, "peak_gib": peak, "step_s": sum(steady) / len(steady),
            "first_step_s": times[0], "loss_first": losses[0], "loss_last": losses[-1],
            "trainable_params": trainable, "adapter_mib": adapter_mb, "reload_max_abs_diff": reload_diff,
            "merged_max_abs_diff": merged_diff, "logit_scale": float(reference.abs().max())}


def markdown(rows: list[dict], args, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    shape = "tiny GPT-Neo (hidden 64)" if args.tiny else "GPT-Neo-1.3B shape (random weights)"
    lines = [f"{shape} on {name}: batch {args.batch_size}, {args.num_segments} segments x {args.segment_size} "
             f"tokens, {args.memory_tokens} memory tokens, LoRA {args.lora_preset} r={args.r}, "
             f"{'layer' if args.gradient_checkpointing else 'segment'} checkpointing, {args.steps} steps",
             "",
             "| mode | peak GPU memory (GiB) | step time (s) | first step (s) | load (s) | loss first -> last "
             "| trainable params | adapter (MiB) | reload max abs diff | merged max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['peak_gib']:.2f} | {r['step_s']:.3f} | {r['first_step_s']:.3f} | "
                     f"{r['load_s']:.1f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} | "
                     f"{r['trainable_params']:,} | {r['adapter_mib']:.1f} | {r['reload_max_abs_diff']:.2e} | "
                     f"{r['merged_max_abs_diff']:.2e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke test)")
    p.add_argument("--modes", default="bf16,8bit,4bit", help="comma-separated subset of bf16,8bit,4bit")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--segment-size", type=int, default=None, help="default 512 (tiny: 16)")
    p.add_argument("--num-segments", type=int, default=4)
    p.add_argument("--memory-tokens", type=int, default=None, help="default 16 (tiny: 4)")
    p.add_argument("--lora-preset", default="attention", choices=["attention", "all-linear"])
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="per-layer checkpointing instead of per-segment checkpointing")
    p.add_argument("--merge", action="store_true", help="also merge LoRA and compare the merged model")
    p.add_argument("--workdir", help="where the base model and adapters go (default: a temporary folder)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the unquantized weights and of 4-bit compute (mode bf16 = no quantization)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.segment_size = args.segment_size or (16 if args.tiny else 512)
    args.memory_tokens = args.memory_tokens or (4 if args.tiny else 16)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}; allowed: {list(MODES)}")
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.tiny else torch.device("cpu")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        base = os.path.join(workdir, "base")
        if not os.path.isdir(base):
            build_base(base, args.tiny, device)
        rows = [run_mode(mode, base, args, device, workdir) for mode in modes]
    print(markdown(rows, args, device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
