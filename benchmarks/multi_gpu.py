"""Several GPUs: tokens/s of 1 vs N GPUs at the same per-GPU batch, and ZeRO-2 / ZeRO-3 losses
against the single-GPU run, through the real training path (recipe -> Trainer -> DeepSpeed).

GPT-Neo-1.3B shape with random weights (saved once to a folder, so every run loads it as a user's
model would: NF4 through bitsandbytes, or bf16), LoRA r=16 on all linear layers, 10 memory
tokens, segments of 1024, the token_memory task, one curriculum stage, no segment checkpointing
(ZeRO-3 cannot recompute whole segments), compiled blocks (the recipe default on a GPU).

Runs, per backbone (``--quantization``):
  single  one process, one GPU, ``gradient_accumulation_steps=N``: the global batch of N GPUs,
          so its losses are the ones ZeRO must reproduce, and its tokens/s is one GPU's at the
          same per-GPU batch (each micro-batch is one GPU's batch).
  zeroK   ``deepspeed --num_gpus N`` with deepspeed_configs/zeroK.json, one micro-batch a step.
Tokens/s = tokens of a step / median step time (after ``--warmup-steps``, which compile);
speed-up = zeroK tokens/s / single tokens/s (the target: >= 1.85 on 2 GPUs); loss difference =
the largest relative difference of the logged per-step losses from the single run's.

    python -m benchmarks.multi_gpu --gpus 2 --quantization 4bit none --zero 2 3 --out multi_gpu.json

``--tiny`` runs the same on CPU ranks (gloo) with a tiny GPT-Neo: the smoke test. Every run's
rows are written to ``--out`` as soon as it ends, so a run cut short keeps what it measured.
The launcher is ``python -m deepspeed.launcher.runner`` (the ``deepspeed`` command), so wheels
installed with ``pip --target`` work.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import yaml

from .common import base_parser, device_of, environment, free, gpt_neo_config, print_table, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_FILE = "bench_steps.json"


# -- inside each training process -----------------------------------------------------------
def worker(argv: list[str]) -> None:
    """Train RECIPE [overrides] as ``rmt-peft train`` does, timing each optimizer step; rank 0
    writes the step times and logged losses to OUTPUT_DIR/bench_steps.json."""
    from transformers import TrainerCallback

    from rmt_peft.train import trainer as engine
    from rmt_peft.recipe import load_recipe

    recipe = load_recipe(argv[0], argv[1:])
    cuda = torch.cuda.is_available()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.losses, self.start = [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    timer = StepTimer()
    stage_trainer = engine.stage_trainer

    def timed_stage_trainer(*args, **kwargs):
        trainer = stage_trainer(*args, **kwargs)
        trainer.add_callback(timer)
        return trainer

    engine.stage_trainer = timed_stage_trainer
    engine.run(recipe, log=lambda *_: None)
    if engine.is_main_process():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
        with open(os.path.join(recipe.output_dir, RESULT_FILE), "w") as f:
            json.dump({"step_seconds": timer.seconds, "losses": timer.losses, "world_size": world,
                       "peak_gib_rank0": peak}, f)


# -- the driver ------------------------------------------------------------------------------
def save_backbone(tiny: bool, folder: str) -> dict:
    """Random weights of the GPT-Neo-1.3B shape (bf16) or the tiny stand-in, saved to ``folder``."""
    from transformers import AutoModelForCausalLM

    config = gpt_neo_config(tiny)
    # Random weights of std 0.02 at width 2048 with GPT-Neo's unscaled attention give nearly hard
    # attention: a sample's loss then moves by up to 0.8 nats under bf16 vs fp32 (docs/training.md),
    # so losses of one GPU and of ZeRO could not be compared. At std 0.006 bf16 and fp32 agree to 0.008.
    config.initializer_range = 0.006
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"  # random init of 1.3B: seconds on a GPU
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if tiny else torch.bfloat16)
    model.save_pretrained(folder)
    del model
    free()
    return {"vocab_size": config.vocab_size}


def recipe_dict(args, backbone: str, vocab: int, quantization: str | None) -> dict:
    gpu = not args.tiny
    per_step = args.batch * args.gpus
    return {
        # bitsandbytes on one GPU too: DeepSpeed runs get it (trainer.build_backbone), so both hold the same weights
        "model": {"name_or_path": backbone, "quantization": quantization, "quantization_backend": "bitsandbytes",
                  "dtype": "bfloat16" if gpu else "float32"},
        "memory": {"num_memory_tokens": args.memory_tokens, "segment_size": args.segment_size},
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        "data": {"task": "token_memory", "options": {"vocab_size": vocab},
                 "num_train_samples": per_step * args.steps, "num_eval_samples": per_step},
        "curriculum": {"stages": [{"num_segments": args.segments, "max_steps": args.steps}]},
        "eval": {"num_segments": [args.segments], "num_samples": per_step},
        # bf16 on GPUs: under ZeRO-3 transformers partitions the backbone in the DeepSpeed config's dtype,
        # fp32 unless training.bf16 is set (the CPU ranks of --tiny cannot use bf16 mixed precision)
        "training": {"output_dir": "OUT", "bf16": gpu, "per_device_train_batch_size": args.batch,
                     "per_device_eval_batch_size": args.batch, "learning_rate": 1e-4,
                     "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "no",
                     "report_to": "none", "seed": 0, "disable_tqdm": True, "dataloader_num_workers": 0},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, recipe_path: str, out: str, zero: int | None) -> tuple[dict | None, str]:
    """One training run; returns (its bench_steps.json, the tail of its output)."""
    overrides = [f"training.output_dir={out}", *args.set]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if zero is None:
        command = [sys.executable, "-m", "benchmarks.multi_gpu", "--worker", recipe_path, *overrides,
                   f"training.gradient_accumulation_steps={args.gpus}"]
        if not args.tiny:
            env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    else:
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.gpus),
                   "--master_port", str(free_port()), "--module", "benchmarks.multi_gpu", "--worker",
                   recipe_path, *overrides, f"training.deepspeed=zero{zero}"]
    t0 = time.perf_counter()
    # its own process group: a run past --run-timeout is killed with every rank the launcher started,
    # so the next run finds the GPUs free
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=args.run_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        output += f"\nTimeoutError: the run took more than --run-timeout={args.run_timeout} s"
    wall = time.perf_counter() - t0
    path = os.path.join(out, RESULT_FILE)
    if process.returncode != 0 or not os.path.exists(path):
        return None, output[-3000:]
    with open(path) as f:
        result = json.load(f)
    result["wall_s"] = wall
    return result, output[-3000:]


def row_of(name: str, quantization: str, result: dict | None, tail: str, args, reference: dict | None) -> dict:
    row = {"backbone": quantization, "run": name}
    if result is None:
        lines = tail.strip().splitlines() or ["no output"]
        row["error"] = next((line for line in reversed(lines) if "Error" in line), lines[-1])[:300]
        row["log_tail"] = tail[-2000:]
        return row
    steps = result["step_seconds"][args.warmup_steps:] or result["step_seconds"]
    seconds = statistics.median(steps)
    tokens = args.batch * args.gpus * args.segments * args.segment_size  # a step, either way
    row.update(gpus=result["world_size"], step_s=seconds, tokens_per_s=tokens / seconds,
               tokens_per_s_per_gpu=tokens / seconds / result["world_size"], peak_gib_rank0=result["peak_gib_rank0"],
               wall_s=result["wall_s"], first_loss=result["losses"][0] if result["losses"] else None,
               last_loss=result["losses"][-1] if result["losses"] else None, losses=result["losses"])
    if reference is not None and "tokens_per_s" in reference:
        row["speedup_vs_single"] = row["tokens_per_s"] / reference["tokens_per_s"]
        pairs = list(zip(result["losses"], reference["losses"]))
        if pairs and len(result["losses"]) == len(reference["losses"]):
            row["max_rel_loss_diff"] = max(abs(a - b) / abs(b) for a, b in pairs)
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "losses"}, flush=True)
    return row


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    if argv and argv[0] == "--worker":
        worker(argv[1:])
        return []
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="GPUs (or CPU ranks with --tiny) of the ZeRO runs")
    parser.add_argument("--quantization", nargs="+", default=["4bit", "none"], choices=["4bit", "none"])
    parser.add_argument("--zero", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="per-GPU batch")
    parser.add_argument("--segment-size", type=int, default=1024)
    parser.add_argument("--memory-tokens", type=int, default=10)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the timing (compiling)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for every run, e.g. model.compile_blocks=false")
    parser.add_argument("--run-timeout", type=int, default=300, help="seconds one training run may take")
    args = parser.parse_args(argv)
    if args.tiny:
        args.segment_size, args.memory_tokens = 8, 2
    device = device_of(args)
    env = environment(device)
    env["gpus_visible"] = torch.cuda.device_count() if device.type == "cuda" else 0
    print(env, flush=True)
    work = tempfile.mkdtemp(prefix="rmt-multi-gpu-")
    backbone = os.path.join(work, "backbone")
    vocab = save_backbone(args.tiny, backbone)["vocab_size"]
    rows = []
    for quantization in args.quantization:
        q = None if quantization == "none" else quantization
        name = q or ("bf16" if not args.tiny else "fp32")
        recipe_path = os.path.join(work, f"recipe-{name}.yaml")
        with open(recipe_path, "w") as f:
            yaml.safe_dump(recipe_dict(args, backbone, vocab, q), f)
        single, tail = launch(args, recipe_path, os.path.join(work, f"{name}-single"), None)
        reference = row_of(f"single GPU, gradient accumulation {args.gpus}", name, single, tail, args, None)
        rows.append(reference)
        write_json(args.out, env, {"multi_gpu": rows})
        for zero in args.zero:
            result, tail = launch(args, recipe_path, os.path.join(work, f"{name}-zero{zero}"), zero)
            rows.append(row_of(f"ZeRO-{zero}, {args.gpus} GPUs", name, result, tail, args, reference))
            write_json(args.out, env, {"multi_gpu": rows})
    print_table(f"1 vs {args.gpus} GPUs, {args.segments} segments x {args.segment_size} tokens, per-GPU batch "
                f"{args.batch}", rows, ["backbone", "run", "gpus", "step_s", "tokens_per_s", "tokens_per_s_per_gpu",
                                         "speedup_vs_single", "max_rel_loss_diff", "peak_gib_rank0", "error"])
    return rows


if __name__ == "__main__":
    main()
