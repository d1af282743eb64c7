"""Quantized backbones side by side (issue 25): speed, memory and loss of each, in one process.

Sections (``--sections``, run in this order; each row is appended to ``OUT_DIR/<section>.jsonl``
as soon as it is measured, and a row that fails records its error while the next one runs):

  train   GPT-Neo-1.3B shape, LoRA r16 on all linear layers, 10 memory tokens, segments of 1,024,
          ``--shape`` 8 x 4 (segments x batch), compiled blocks, bf16 autocast, no segment
          checkpointing (train.py's ``ours-compiled-nockpt``), for each of ``--backbones``: bf16;
          torch-8bit, torch-4bit, fp8 (``quantization_backend="torch"``); bnb-4bit-cache and
          bnb-4bit (bitsandbytes NF4 with and without the dequantized-weight cache); bnb-8bit
          (LLM.int8, slow, not in the default list). Per row: tokens/s and the ratio to bf16, peak
          GiB, the backbone's allocated bytes per frozen weight, and the loss on a fixed batch
          (before any step: LoRA starts at zero, so it is the backbone's loss) against bf16's;
          with ``--kernel-time``, one profiled step's GPU kernel time, which host noise does not move.
  auto    ``checkpoint_segments="auto"`` on ``--auto-backbone`` (torch-4bit) at the same shape under
          a ``--cap-gib`` (32) cap, against the same backbone's uncapped row without checkpointing
          (run right after that backbone's train row, on the same model); then the same with the
          blocks compiled at each of ``--auto-budgets`` (``compile_blocks(memory_budget=...)``:
          smaller segments, so "auto" keeps more of them), and with ``--auto-chooses`` at the budget
          "auto" chooses itself (``memory.activation_budget``).
  stream  ``--stream-tokens`` (2,048,000) through ``rmt.stream()`` with its defaults (LoRA read
          through merged copies, CUDA graphs from segment 17), segments of ``--stream-segment-size``
          (2,028): bf16 plain and inside ``torch.autocast("cuda", dtype=torch.bfloat16)`` (their
          memories must be equal), bf16 with compiled blocks, fp8 plain and with compiled blocks
          (their graphs captured too, from segment 17; each row says whether it replayed graphs);
          ``--stream-rows`` runs some of them.
  answers the trained model of ``--answers-run`` (a run folder of ``rmt-peft train quickstart``) loaded
          by ``RMTModel.from_pretrained`` in bf16 and as each of ``--answers-backbones`` (torch-held,
          the user's path: ``quantization=..., quantization_backend="torch"``): per sample the answer
          token (argmax) and its loss at ``--answers-segments`` segments, against bf16's.
  opt     a training step of the babilong_reasoning_opt_6.7b_8bit recipe (its memory, LoRA, per-layer
          and segment checkpointing; OPT-6.7B's shape with random weights; compiled blocks, bf16
          autocast as ``training.bf16``), ``--opt-shape`` 4 x 2 with segments of ``--opt-segment-size``
          (512), under a ``--opt-cap-gib`` (24) cap, for each of ``--opt-backbones``.

    python -m benchmarks.quantized --sections train auto --out-dir runs/issue25
    python -m benchmarks.quantized --sections stream opt --out-dir runs/issue25
"""
from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F

from rmt_peft import resources
from rmt_peft.adapters import parameter_count
from rmt_peft.backbones import enable_checkpointing
from rmt_peft.data.token_memory import TokenMemoryTask
from rmt_peft.memory import MemoryConfig
from rmt_peft.quantized_linear import quantized_bytes
from rmt_peft.recipe import load_recipe
from rmt_peft.recurrent import RMTModel
from rmt_peft.speedups import compile_blocks, dequantized_cache_bytes

from .common import (GIB, base_parser, build_backbone, device_of, environment, free, gpt_neo_config, kernel_seconds,
                     lora_config, measure, opt_config, optimizer_for, sync)
from .train import FAST, Bench, profiled_step

# backbone name -> (build_backbone's quantization, the dequantized-weight cache)
BACKBONES = {"bf16": (None, False), "torch-8bit": ("torch-8bit", False), "torch-4bit": ("torch-4bit", False),
             "fp8": ("fp8", False), "bnb-4bit-cache": ("4bit", True), "bnb-4bit": ("4bit", False),
             "bnb-8bit": ("8bit", False)}
DEFAULT_BACKBONES = ["bf16", "torch-8bit", "torch-4bit", "fp8", "bnb-4bit-cache", "bnb-4bit"]
SECTIONS = ("train", "auto", "stream", "answers", "opt")
# the stream section's rows, in the order they run: name -> (backbone, compiled blocks, inside autocast)
STREAM_ROWS = {"bf16": ("bf16", False, False), "bf16-autocast": ("bf16", False, True),
               "bf16-compiled": ("bf16", True, False), "fp8": ("fp8", False, False),
               "fp8-compiled": ("fp8", True, False)}
# build_backbone's torch-held names -> from_pretrained's quantization (with quantization_backend="torch")
LOADED_AS = {"torch-8bit": "8bit", "torch-4bit": "4bit", "fp8": "fp8"}
OPT_RECIPE = "babilong_reasoning_opt_6.7b_8bit"


class Log:
    """Rows appended to OUT_DIR/<section>.jsonl as they come, and kept for the summary."""

    def __init__(self, out_dir: str | None, env: dict):
        self.out_dir, self.rows = out_dir, []
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "environment.json"), "w") as f:
                json.dump(env, f, indent=1)

    def __call__(self, section: str, row: dict) -> dict:
        row = {"section": section, **row}
        self.rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        if self.out_dir:
            with open(os.path.join(self.out_dir, f"{section}.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        return row


def failed(err: Exception) -> dict:
    return {"error": f"{type(err).__name__}: {str(err)[:400]}"}


def capped(device: torch.device, gib: float | None) -> None:
    """Cap what torch may allocate on ``device`` (None: the whole GPU again)."""
    if device.type != "cuda":
        return
    free()
    if device.index is None:  # set_per_process_memory_fraction needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total) if gib else 1.0, device)


def bytes_per_weight(bench: Bench, cache: bool) -> dict:
    """The backbone's allocated bytes per frozen weight (with the bf16 copies when cached), and
    the quantized layers' own bytes per weight they hold (torch-held backbones)."""
    out = {}
    if bench.backbone_bytes is not None:
        extra = dequantized_cache_bytes(bench.peft)[0] if cache else 0
        out["backbone_bytes_per_weight"] = (bench.backbone_bytes + extra) / bench.frozen_weights
    size, weights = quantized_bytes(bench.peft, tables=False)
    if weights:
        out["quantized_layer_bytes_per_weight"] = size / weights
    return out


@torch.no_grad()
def fixed_batch_loss(bench: Bench, ids: torch.Tensor) -> float:
    """The loss on ``ids`` before any step, with the same initial memory for every backbone."""
    memory = bench.ours.memory.memory_tokens
    generator = torch.Generator().manual_seed(0)
    memory.copy_(torch.randn(memory.shape, generator=generator).to(memory) * 0.02)
    with torch.autocast(bench.device.type, dtype=torch.bfloat16, enabled=bench.device.type == "cuda"):
        return float(bench.ours(ids, labels=ids).loss)


def train_section(args, device, log, sections) -> None:
    config = gpt_neo_config(args.tiny)
    segments, batch = (int(v) for v in args.shape.split("x"))
    ids = torch.randint(0, config.vocab_size, (batch, segments * args.segment_size),
                        generator=torch.Generator().manual_seed(1)).to(device)
    reference = {}
    for name in args.backbones:
        quantization, cache = BACKBONES[name]
        bench = None
        try:
            bench = Bench(config, quantization, device, args.segment_size, args.memory_tokens, None, args.warmup,
                          args.repeat)
            loss = fixed_batch_loss(bench, ids)
            bench.set_levers(**FAST, compile=not args.tiny or args.compile_tiny, dequant_cache=cache)
            row = bench.run("ours", segments, batch, f"{name}, compiled, no checkpointing")
            row.update(backbone=name, loss_fixed_batch=loss, **bytes_per_weight(bench, cache))
            if args.kernel_time and device.type == "cuda" and not row["oom"]:
                row.update(kernel_seconds(profiled_step(bench, "ours", segments, batch, row["impl"])[1]))
            if name == "bf16":
                reference = row
            elif reference and row.get("tokens_per_s"):
                row["speed_vs_bf16"] = row["tokens_per_s"] / reference["tokens_per_s"]
                if row.get("kernel_s") and reference.get("kernel_s"):
                    row["kernel_speed_vs_bf16"] = reference["kernel_s"] / row["kernel_s"]
                row["loss_rel_diff_vs_bf16"] = abs(loss - reference["loss_fixed_batch"]) / reference["loss_fixed_batch"]
            log("train", row)
            if "auto" in sections and name == args.auto_backbone:
                for budget in [1.0, *args.auto_budgets, *([None] if args.auto_chooses else [])]:
                    auto_row(args, bench, segments, batch, row, log, budget)
        except Exception as err:
            log("train", {"backbone": name, **failed(err)})
        del bench
        torch._dynamo.reset()  # the next backbone compiles anew; this drops what held the last one
        free()


def auto_row(args, bench: Bench, segments: int, batch: int, uncapped: dict, log, budget: float | None = 1.0) -> None:
    """checkpoint_segments="auto" under the cap, on the backbone of ``uncapped`` (its row without
    checkpointing), the blocks compiled at activation ``budget``; None: at the budget "auto" chooses
    (as ``from_backbone(compile=True)`` sets it up; it compiles again after the first step, a
    warm-up step)."""
    try:
        capped(bench.device, args.cap_gib)
        compile = not args.tiny or args.compile_tiny
        bench.set_levers(**FAST, compile=compile, checkpoint_segments="auto", memory_budget=budget or 1.0)
        if budget is None and compile:
            bench.ours._compiled = {"compile": True, "scope": "blocks", "budget": 1.0, "auto": True}
            bench.compiled = None  # auto may compile the blocks again: set_levers compiles anew after this row
        label = ", memory_budget chosen by auto" if budget is None else f", memory_budget={budget}" if budget < 1 else ""
        row = bench.run("ours", segments, batch, f"{uncapped['backbone']}, compiled{label}, checkpoint_segments=auto, "
                                                 f"cap {args.cap_gib} GiB")
        chosen = (bench.ours._compiled or {}).get("budget")  # what auto chose (None: not compiled here)
        row.update(backbone=uncapped["backbone"], cap_gib=args.cap_gib, kept_segments=bench.ours._auto_kept,
                   memory_budget=chosen if budget is None else budget)
        if row.get("tokens_per_s") and uncapped.get("tokens_per_s"):
            row["speed_vs_uncapped_no_checkpointing"] = row["tokens_per_s"] / uncapped["tokens_per_s"]
        log("auto", row)
    except Exception as err:
        log("auto", {"backbone": uncapped.get("backbone"), **failed(err)})
    finally:
        bench.ours._compiled = None
        capped(bench.device, None)
        bench.set_levers("sdpa")


def stream_rmt(name: str, device, args) -> RMTModel:
    backbone = build_backbone(gpt_neo_config(args.tiny), BACKBONES[name][0], device, attention="sdpa")
    rmt = RMTModel.from_backbone(backbone, MemoryConfig(num_memory_tokens=args.memory_tokens,
                                                        segment_size=args.stream_segment_size),
                                 lora=lora_config(), verbose=False)
    return rmt.eval()


def stream_once(rmt: RMTModel, ids: torch.Tensor, chunk: int, autocast: bool):
    """The stream's result, and whether it replayed CUDA graphs (the default decides)."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        reader = rmt.stream()
        for start in range(0, ids.shape[1], chunk):
            reader.feed(ids[:, start:start + chunk])
        return reader.finish(), reader._graph is not None


def stream_section(args, device, log) -> None:
    config = gpt_neo_config(args.tiny)
    ids = torch.randint(0, config.vocab_size, (1, args.stream_tokens), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)
    # past segment 17 (the CUDA graph is captured), and ending in a segment as short as the timed
    # stream's last one: compiled blocks (static shapes) then meet no new length in the timed stream
    warm = ids[:, :20 * args.stream_segment_size + args.stream_tokens % args.stream_segment_size]
    rmt, built, plain = None, None, {}
    for row_name in args.stream_rows:
        name, compiled, autocast = STREAM_ROWS[row_name]
        if compiled and args.tiny and not args.compile_tiny:
            continue
        label = f"stream {args.stream_tokens} tokens, {name}{', compiled blocks' if compiled else ''}" \
                f"{', inside autocast(bf16)' if autocast else ''}"
        try:
            if built != name:
                rmt = None
                free()
                rmt, built = stream_rmt(name, device, args), name
            if compiled:
                # static: torch would compile the short last segment's length as a symbol, and every
                # later segment would run a graph dynamic in its length (see train.Bench.set_levers)
                compile_blocks(rmt.causal_lm, dynamic=False)
            stream_once(rmt, warm, args.chunk, autocast)
            free()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            result, graphed = stream_once(rmt, ids, args.chunk, autocast)
            sync(device)
            seconds = time.perf_counter() - t0
            row = {"run": label, "backbone": name, "compiled": compiled, "autocast": autocast, "cuda_graphs": graphed,
                   "tokens": args.stream_tokens, "seconds": seconds, "tokens_per_s": args.stream_tokens / seconds,
                   "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None}
            twin = plain.get((name, compiled))
            if autocast and twin:  # inside autocast the stream must compute exactly the plain one
                row["time_vs_plain"] = seconds / twin[0]
                row["memory_max_abs_diff_vs_plain"] = float((result.memory - twin[1]).abs().max())
            if compiled and (name, False) in plain:  # how far fused rounding takes the memory over the stream
                row["memory_max_abs_diff_vs_uncompiled"] = float((result.memory - plain[(name, False)][1]).abs().max())
            if not autocast:
                plain[(name, compiled)] = (seconds, result.memory)
            if name != "bf16" and ("bf16", False) in plain:
                row["time_vs_bf16"] = seconds / plain[("bf16", False)][0]
            log("stream", row)
        except Exception as err:
            log("stream", {"run": label, **failed(err)})
    del rmt
    free()


@torch.no_grad()
def answers_of(rmt: RMTModel, segments: int, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer token argmax, answer loss) per sample of the quickstart's task at ``segments``."""
    cfg = rmt.memory_config
    task = TokenMemoryTask(num_samples, segments, cfg.segment_size, vocab_size=rmt.causal_lm.config.vocab_size,
                           seed=777)  # not a seed training or the run's evaluation used
    ids = torch.stack([task[i]["input_ids"] for i in range(num_samples)]).to(rmt.memory_tokens.device)
    logits = rmt(ids, return_logits=True).logits[:, -2].float()  # position -2 predicts the answer
    return logits.argmax(-1).cpu(), F.cross_entropy(logits, ids[:, -1], reduction="none").cpu()


def answers_section(args, device, log) -> None:
    """Answers and loss of each quantized backbone against bf16's on the trained quickstart model."""
    final = os.path.join(args.answers_run, "final")
    reference = {}
    for name in ["bf16", *args.answers_backbones]:
        rmt = None
        try:
            quantization = LOADED_AS.get(name)
            options = {"quantization_backend": "torch"} if quantization else {}
            device_map = {"": device.index or 0} if device.type == "cuda" else None
            rmt = RMTModel.from_pretrained(final, quantization=quantization, dtype=torch.bfloat16,
                                           device_map=device_map, **options)
            for segments in args.answers_segments:
                answers, losses = answers_of(rmt, segments, args.answers_samples)
                row = {"backbone": name, "segments": segments, "samples": len(answers),
                       "loss": float(losses.mean())}
                if name == "bf16":
                    reference[segments] = (answers, losses)
                else:
                    ref_answers, ref_losses = reference[segments]
                    row.update(answers_equal=int((answers == ref_answers).sum()),
                               loss_vs_bf16=float(losses.mean() / ref_losses.mean()) - 1)
                log("answers", row)
        except Exception as err:
            log("answers", {"backbone": name, **failed(err)})
        finally:
            del rmt
            free()


def training_step(rmt: RMTModel, ids: torch.Tensor):
    """One step as the trainer runs it with ``training.bf16``: autocast forward, backward, AdamW."""
    optimizer = optimizer_for(rmt)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.device.type == "cuda"):
            loss = rmt(ids, labels=ids).loss
        loss.backward()
        optimizer.step()

    return step


def opt_section(args, device, log) -> None:
    """The OPT-6.7B recipe's training step under the cap, for each backbone."""
    overrides = [f"memory.segment_size={args.opt_segment_size}", "training.report_to=none"]
    try:
        recipe = load_recipe(resources.recipe_path(OPT_RECIPE), overrides, check_files=False)
    except Exception as err:
        log("opt", {"recipe": OPT_RECIPE, **failed(err)})
        return
    config = opt_config(args.tiny)
    memory = recipe.memory
    if args.tiny:
        memory = MemoryConfig.from_dict({**memory.to_dict(), "segment_size": args.segment_size,
                                         "num_memory_tokens": args.memory_tokens})
    segments, batch = (int(v) for v in args.opt_shape.split("x"))
    ids = torch.randint(0, config.vocab_size, (batch, segments * memory.segment_size),
                        generator=torch.Generator().manual_seed(3)).to(device)
    for name in args.opt_backbones:
        rmt = backbone = None  # the last backbone freed before `before`: the delta is this one's alone
        try:
            free()
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
            backbone = build_backbone(config, BACKBONES[name][0], device, attention="sdpa")
            free()
            held = torch.cuda.memory_allocated(device) - before if before is not None else None
            weights = sum(parameter_count(p) for p in backbone.parameters())
            capped(device, args.opt_cap_gib)  # after building: the bf16 weights it quantized are gone
            rmt = RMTModel.from_backbone(backbone, memory, lora=recipe.lora, verbose=False,
                                         compile=not args.tiny or args.compile_tiny)
            if recipe.training.get("gradient_checkpointing"):
                enable_checkpointing(rmt.causal_lm, drop_input_hook=False)  # as the trainer does
            result = measure(training_step(rmt.train(), ids), device, args.warmup, args.repeat)
            tokens = ids.numel()
            row = {"backbone": name, "recipe": OPT_RECIPE, "segments": segments, "batch": batch,
                   "segment_size": memory.segment_size, "cap_gib": args.opt_cap_gib, "oom": result.oom,
                   "step_s": result.seconds, "tokens_per_s": None if result.oom else tokens / result.seconds,
                   "peak_gib": result.peak_gib}
            if held is not None:
                row["backbone_gib"] = held / GIB
                row["backbone_bytes_per_weight"] = held / weights
            log("opt", row)
        except Exception as err:
            log("opt", {"backbone": name, **failed(err)})
        finally:
            rmt = backbone = None
            torch._dynamo.reset()
            capped(device, None)


def main(argv=None) -> list[dict]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--out-dir", help="append each row to OUT_DIR/<section>.jsonl")
    parser.add_argument("--sections", nargs="+", default=[s for s in SECTIONS if s != "answers"], choices=SECTIONS,
                        help="default: all but answers (which needs --answers-run)")
    parser.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES, choices=list(BACKBONES))
    parser.add_argument("--shape", default="8x4", help="SEGMENTSxBATCH of the train rows")
    parser.add_argument("--segment-size", type=int, default=1024)
    parser.add_argument("--memory-tokens", type=int, default=10)
    parser.add_argument("--kernel-time", action="store_true",
                        help="train: also profile one step per row for its GPU kernel time (kernel_s, by kind), which "
                             "the host's noise does not move, and the ratio to bf16's (kernel_speed_vs_bf16)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--auto-backbone", default="torch-4bit", choices=list(BACKBONES))
    parser.add_argument("--cap-gib", type=float, default=32.0)
    parser.add_argument("--auto-budgets", type=float, nargs="*", default=[],
                        help="auto: also with the blocks compiled at these activation budgets (0-1)")
    parser.add_argument("--auto-chooses", action="store_true",
                        help="auto: also at the budget auto chooses (from_backbone(compile=True)'s setup)")
    parser.add_argument("--stream-tokens", type=int, default=2_048_000)
    parser.add_argument("--stream-segment-size", type=int, default=2028)
    parser.add_argument("--stream-rows", nargs="+", default=list(STREAM_ROWS), choices=list(STREAM_ROWS),
                        help="stream: the rows to run (in this order; each against bf16 when that row ran first)")
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--answers-run", help="answers: a run folder of `rmt-peft train quickstart`")
    parser.add_argument("--answers-backbones", nargs="+", default=["fp8", "torch-8bit", "torch-4bit"],
                        choices=list(LOADED_AS))
    parser.add_argument("--answers-segments", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--answers-samples", type=int, default=256)
    parser.add_argument("--opt-backbones", nargs="+", default=["torch-8bit", "torch-4bit", "fp8"],
                        choices=list(BACKBONES))
    parser.add_argument("--opt-shape", default="4x2", help="SEGMENTSxBATCH (the recipe's batch: 2)")
    parser.add_argument("--opt-segment-size", type=int, default=512)
    parser.add_argument("--opt-cap-gib", type=float, default=24.0)
    parser.add_argument("--compile-tiny", action="store_true", help="compile blocks in --tiny runs too (slow on CPU)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.segment_size, args.memory_tokens = min(args.segment_size, 32), min(args.memory_tokens, 4)
        args.stream_segment_size, args.stream_tokens = 32, min(args.stream_tokens, 1024)
        args.chunk = min(args.chunk, 100)
    device = device_of(args)
    # several backbones and shapes compile the same block code in one process (see train.py)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    env = environment(device)
    log = Log(args.out_dir, env)
    print(env, flush=True)
    if "train" in args.sections or "auto" in args.sections:
        train_section(args, device, log, args.sections)
    if "stream" in args.sections:
        stream_section(args, device, log)
    if "answers" in args.sections:
        if not args.answers_run:
            parser.error("--sections answers needs --answers-run RUN_FOLDER")
        answers_section(args, device, log)
    if "opt" in args.sections:
        opt_section(args, device, log)
    summary(log.rows)
    return log.rows


def summary(rows: list[dict]) -> None:
    columns = ["section", "backbone", "run", "impl", "tokens_per_s", "speed_vs_bf16", "peak_gib",
               "backbone_bytes_per_weight", "quantized_layer_bytes_per_weight", "loss_fixed_batch",
               "loss_rel_diff_vs_bf16", "kept_segments", "memory_budget", "speed_vs_uncapped_no_checkpointing", "seconds",
               "time_vs_plain", "memory_max_abs_diff_vs_plain", "time_vs_bf16", "oom", "error"]
    used = [c for c in columns if any(c in r for r in rows)]
    print("\n| " + " | ".join(used) + " |\n|" + "---|" * len(used))
    for row in rows:
        cells = []
        for c in used:
            v = row.get(c)
            cells.append("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)[:90])
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
