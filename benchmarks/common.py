"""What every benchmark shares: model shapes built from configs (nothing is downloaded), the
reference-style RMT loop, timing and peak memory, FLOP counts and the result table.

Every benchmark takes ``--tiny`` (CPU-sized shapes, used by tests/test_bench_smoke.py so the
scripts do not rot; ``--device cuda`` runs them on the GPU), and ``--out FILE`` (JSON of every
row, with the device and the date).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPTNeoConfig, LlamaConfig, OPTConfig

from rmt_peft import flops
from rmt_peft.attention import use_gpt_neo_sdpa
from rmt_peft.backbones import load_backbone
from rmt_peft.quantized_embedding import embedding_matrix, quantize_embeddings
from rmt_peft.quantized_linear import quantize_linears

GIB = 2 ** 30


# -- shapes ---------------------------------------------------------------------------------
def gpt_neo_config(tiny: bool = False) -> GPTNeoConfig:
    """EleutherAI/gpt-neo-1.3B's shape (or a CPU-sized stand-in with the same structure)."""
    if tiny:
        return GPTNeoConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                            attention_types=[[["global", "local"], 1]], max_position_embeddings=256,
                            window_size=32, bos_token_id=0, eos_token_id=1)
    return GPTNeoConfig(vocab_size=50257, hidden_size=2048, num_layers=24, num_heads=16,
                        attention_types=[[["global", "local"], 12]], max_position_embeddings=2048,
                        window_size=256, bos_token_id=50256, eos_token_id=50256)


def llama_config(tiny: bool = False) -> LlamaConfig:
    """A ~1.1B Llama-style RoPE model (TinyLlama-1.1B's shape), positions unbounded in practice."""
    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, max_position_embeddings=1 << 17,
                           bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    return LlamaConfig(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=1 << 18,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def opt_config(tiny: bool = False) -> OPTConfig:
    """facebook/opt-6.7b's shape (the babilong_reasoning_opt_6.7b_8bit recipe's backbone), or a CPU-sized one."""
    if tiny:
        return OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                         word_embed_proj_dim=64, max_position_embeddings=256, bos_token_id=2, eos_token_id=2,
                         pad_token_id=1)
    return OPTConfig(vocab_size=50272, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     ffn_dim=16384, word_embed_proj_dim=4096, max_position_embeddings=2048, bos_token_id=2,
                     eos_token_id=2, pad_token_id=1)


def device_of(args) -> torch.device:
    """``--device``: "auto" is the GPU when there is one, except with ``--tiny`` (the CPU smoke);
    "cuda" runs even ``--tiny`` shapes on the GPU (a quick look at compile or CUDA-graph behaviour
    there before a full-size run)."""
    choice = getattr(args, "device", "auto")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    return torch.device(choice)


_SAVED: dict[str, str] = {}


# backbones held by torch (quantization_backend="torch"): their name -> load_backbone's quantization
TORCH_HELD = {"torch-8bit": "8bit", "torch-4bit": "4bit", "fp8": "fp8"}


def build_backbone(config, quantization: str | None, device: torch.device, attention: str = "sdpa"):
    """A random-weight causal LM of ``config``: bf16 on the GPU (fp32 on CPU); bitsandbytes NF4 /
    LLM.int8 ("4bit" / "8bit") by saving the random bf16 weights and loading them through
    ``load_backbone`` (the user's path); or torch-held "torch-8bit" / "torch-4bit" / "fp8"
    (``TORCH_HELD``): the random model quantized in place by ``quantize_linears`` and
    ``quantize_embeddings``, what
    ``load_backbone(quantization_backend="torch")`` does after loading, without the round trip
    through the disk (an OPT-6.7B would write and read 13 GB), and FP8 also on the CPU (tests).
    attention: "sdpa" (GPT-Neo: rmt_peft.attention; others: torch SDPA) or "eager"."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    native = "eager" if config.model_type == "gpt_neo" else attention
    config = copy.deepcopy(config)  # switching attention renames the config's implementation
    if quantization is None or quantization in TORCH_HELD:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=native)
        if quantization is not None:
            quantize_linears(model, TORCH_HELD[quantization], device)
            quantize_embeddings(model, device)
            free()
    else:
        key = repr(config.to_dict())
        if key not in _SAVED:
            torch.manual_seed(0)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=native)
            _SAVED[key] = tempfile.mkdtemp(prefix="rmt-bench-")
            model.save_pretrained(_SAVED[key])
            del model
            free()
        device_map = {"": device.index or 0} if device.type == "cuda" else None
        model = load_backbone(_SAVED[key], quantization=quantization, dtype=dtype, device_map=device_map,
                              attn_implementation=native, speedups=False,  # the levers are set per run
                              quantization_backend="bitsandbytes")
    if attention == "sdpa":
        use_gpt_neo_sdpa(model)
    return model


def lora_config(rank: int = 16):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = params[0].is_cuda
    return torch.optim.AdamW(params, lr=1e-4, fused=fused)


# -- the reference ----------------------------------------------------------------------------
class ReferenceRMT(torch.nn.Module):
    """The reference RMT training loop, in the style of RecurrentWrapper / MemoryCell
    (booydar/recurrent-memory-transformer): each segment is a full causal-LM forward of
    [memory; segment; memory] with output_hidden_states=True, the new memory is the last hidden
    state at the write positions, the logits of all segments are concatenated and the loss is
    taken on the concatenation. No checkpointing."""

    def __init__(self, backbone, num_memory_tokens: int, segment_size: int):
        super().__init__()
        self.backbone = backbone
        embeddings = backbone.get_input_embeddings()
        table = embedding_matrix(embeddings)
        std = float(table.detach().float().std())
        self.memory = torch.nn.Parameter(torch.randn(num_memory_tokens, embeddings.embedding_dim,
                                                     device=table.device) * std)
        self.m, self.segment_size = num_memory_tokens, segment_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch = input_ids.shape[0]
        embed = self.backbone.get_input_embeddings()
        memory = self.memory.unsqueeze(0).expand(batch, -1, -1)
        logits = []
        for start in range(0, input_ids.shape[1], self.segment_size):
            segment = embed(input_ids[:, start:start + self.segment_size])
            memory = memory.to(segment.dtype)
            inputs = torch.cat([memory, segment, memory], dim=1)
            mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
            out = self.backbone(inputs_embeds=inputs, attention_mask=mask, output_hidden_states=True)
            memory = out.hidden_states[-1][:, -self.m:]
            logits.append(out.logits[:, self.m:-self.m])
        full = torch.cat(logits, dim=1)
        return F.cross_entropy(full[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


# -- measuring -------------------------------------------------------------------------------
def layers_checkpointed(lm) -> bool:
    """Whether the model's layers are checkpointed (transformers renamed the property in 5.2x)."""
    on = getattr(lm, "is_activation_checkpointing", None)
    return lm.is_gradient_checkpointing if on is None else on


def stop_checkpointing_layers(lm) -> None:
    if layers_checkpointed(lm):
        off = getattr(lm, "activation_checkpointing_disable", None) or lm.gradient_checkpointing_disable
        off()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measurement:
    seconds: float  # median over the timed repeats
    peak_gib: float | None  # peak allocated during warm-up and timed repeats (None on CPU)
    oom: bool = False
    first_s: float | None = None  # the first call's time: with compiled code, mostly compiling


def measure(step: Callable[[], object], device: torch.device, warmup: int = 1, repeat: int = 3) -> Measurement:
    """Median wall time of ``step`` (synchronised) and the peak GPU memory it reached."""
    free()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, oom = [], False
    try:
        for _ in range(warmup + repeat):
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        oom = True  # free outside the handler: the traceback holds the step's activations
    if oom:
        free()
        return Measurement(float("nan"), None, oom=True)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return Measurement(statistics.median(times[warmup:]), peak, first_s=times[0])


def kernel_kind(name: str) -> str:
    """"matmul", "attention" or "other" for a CUDA kernel's name (cuBLAS / cuDNN / cutlass / flash)."""
    name = name.lower()
    if any(key in name for key in ("fmha", "flash", "sdpa", "attention")):
        return "attention"
    if any(key in name for key in ("gemm", "nvjet", "xmma", "cutlass", "matmul")):
        return "matmul"
    return "other"


def kernel_seconds(events) -> dict:
    """GPU kernel time of ``events`` (a profile's ``key_averages()``), in all and by
    ``kernel_kind``: {"kernel_s", "matmul_s", "attention_s", "other_s"}. Unlike a step's wall time
    it does not move with the host: on an H100 where identical training steps took 0.75-1.25 s,
    their kernels repeated to 0.002 s (BENCHMARKS.md, issue 25, "Eighth pass")."""
    out = {"kernel_s": 0.0, "matmul_s": 0.0, "attention_s": 0.0, "other_s": 0.0}
    for event in events:  # kernels only: an op's event repeats its kernels' time
        if event.device_type == torch.autograd.DeviceType.CUDA:
            seconds = event.self_device_time_total / 1e6
            out["kernel_s"] += seconds
            out[f"{kernel_kind(event.key)}_s"] += seconds
    return out


# -- FLOPs -----------------------------------------------------------------------------------
def matmul_params(config) -> int:
    """Weights every token multiplies through (all linear layers + the LM head), excluding LoRA:
    rmt_peft.flops' count, the one of ``rmt-peft flops``."""
    return flops.matmul_params(flops.shape_from_config(config))


def attention_keys(config, positions: int) -> list[float]:
    """Mean number of keys a query attends to, per layer, in a causal pass over ``positions``."""
    if config.model_type == "gpt_neo":
        w = config.window_size
        local = sum(min(i + 1, w) for i in range(positions)) / positions
        return [local if kind == "local" else (positions + 1) / 2 for kind in config.attention_layers]
    return [(positions + 1) / 2] * config.num_hidden_layers


def train_flops_per_token(config, positions: int) -> float:
    """Model FLOPs per input token of a LoRA training step: 4N (forward 2N + input-gradient 2N;
    frozen weights get no weight gradient) + attention (q.k and p.v, 4·d per attended key,
    x3 for forward + backward). Recompute and LoRA's small matmuls are not counted."""
    d = config.hidden_size
    return 4 * matmul_params(config) + sum(3 * 4 * d * k for k in attention_keys(config, positions))


def forward_flops_per_token(config, positions: int) -> float:
    d = config.hidden_size
    return 2 * matmul_params(config) + sum(4 * d * k for k in attention_keys(config, positions))


def bf16_matmul_tflops(device: torch.device, n: int = 8192, repeat: int = 10) -> float | None:
    """Measured dense bf16 matmul rate (the MFU denominator), on random data."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeat / (time.perf_counter() - t0) / 1e12


# -- reporting -------------------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized shapes (smoke test)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the GPU if there is one, the CPU with --tiny; cuda: --tiny shapes on the GPU too")
    parser.add_argument("--out", help="write the rows as JSON here")
    return parser


def environment(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "host": platform.node()}
    import transformers

    info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GIB, 1)
    else:
        info["device"] = "cpu"
    return info


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "OOM"
        return f"{value:.{digits}f}"
    return str(value)


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n### {title}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")


def write_json(path: str | None, env: dict, tables: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"environment": env, "tables": tables}, f, indent=1)
