"""Associative memory against the authors' ARMT code: loss, logits and the memory's gradients.

Two sides, two Python environments (the authors' file runs on the transformers of its time, 4.x:
its layer wrapper takes ``hidden_states`` positionally and reads ``out[0]`` of a layer's tuple,
which transformers 5 no longer returns):

    # 1. the authors' side, in a venv with transformers 4.41 (scripts/armt_reference.sh makes it)
    python scripts/armt_reference.py authors --authors-file PATH/modeling_amt/language_modeling.py --out /tmp/armt
    # 2. our side, in the project's venv: same weights, same inputs, compared
    python scripts/armt_reference.py ours --out /tmp/armt

The authors' side builds tiny GPT-2 and GPT-NeoX models from configs (seeded), wraps them in the
authors' ``AssociativeMemoryCell`` + ``AssociativeRecurrentWrapper`` (no position wrapping, as
their scripts run it; correction on), gives the value projections random weights (they start
at zero, which would leave the read path untested), and saves the backbone, the memory
parameters, the inputs and, at 1, 2 and 5 segments, the loss, logits and the gradients of every
memory parameter. Our side loads the same backbone and parameters into
``RMTModel(memory_kind="associative")`` and reports the largest differences. Nothing is
downloaded; the authors' file is read from wherever it is (e.g. a clone of
github.com/RodkinIvan/associative-recurrent-memory-transformer), never copied into this repository.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import types

import torch

ARCHITECTURES = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}
SEGMENTS = (1, 2, 5)
SEGMENT_SIZE, MEMORY_TOKENS, KEY_SIZE, BATCH, VOCAB = 8, 3, 8, 2, 128


def tiny_config(arch: str):
    from transformers import GPT2Config, GPTNeoXConfig

    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, max_position_embeddings=64)


def _grad(p: torch.Tensor) -> torch.Tensor:
    """The gradient, zero where the loss does not reach (one segment reads no memory)."""
    return torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()


# -- the authors' side ----------------------------------------------------------------------------
def load_authors(path: str):
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))  # imported for a commented-out log call
    spec = importlib.util.spec_from_file_location("armt_authors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def authors(args) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    armt = load_authors(args.authors_file)
    for arch, layers_attr in ARCHITECTURES.items():
        torch.manual_seed(0)
        backbone = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()  # eval: no dropout
        backbone.save_pretrained(os.path.join(args.out, arch))
        cell = armt.AssociativeMemoryCell(backbone, num_mem_tokens=MEMORY_TOKENS, d_mem=KEY_SIZE,
                                          layers_attr=layers_attr, wrap_pos=False, correction=True)
        with torch.no_grad():
            for layer in cell.layers:
                layer.W_mv.weight.normal_(0, 64 ** -0.5)
        model = armt.AssociativeRecurrentWrapper(cell, segment_size=SEGMENT_SIZE, max_n_segments=max(SEGMENTS),
                                                 segment_alignment="left")
        params = {"memory_tokens": cell.memory}
        for i, layer in enumerate(cell.layers):
            params.update({f"associative.layers.{i}.query.weight": layer.W_mq.weight,
                           f"associative.layers.{i}.key.weight": layer.W_mk.weight,
                           f"associative.layers.{i}.value.weight": layer.W_mv.weight,
                           f"associative.layers.{i}.gate.weight": layer.W_mb.weight,
                           f"associative.layers.{i}.gate.bias": layer.W_mb.bias})
        ids = torch.randint(2, VOCAB, (BATCH, SEGMENT_SIZE * max(SEGMENTS)), generator=torch.Generator().manual_seed(1))
        tensors = {f"param.{n}": p.detach().clone() for n, p in params.items()}
        tensors["input_ids"] = ids
        for n in SEGMENTS:
            x = ids[:, :SEGMENT_SIZE * n]
            for p in params.values():
                p.grad = None
            # the authors always pass a mask (without one, their cell hands `prev_attn_mask` to the model)
            out = model(input_ids=x, labels=x, attention_mask=torch.ones_like(x))
            out["loss"].backward()
            tensors[f"{n}.loss"] = out["loss"].detach().double().reshape(1)
            tensors[f"{n}.logits"] = out["logits"].detach()
            tensors.update({f"{n}.grad.{name}": _grad(p) for name, p in params.items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(args.out, f"{arch}.safetensors"))
        print(f"{arch}: wrote the authors' results for {SEGMENTS} segments to {args.out}")


# -- our side -------------------------------------------------------------------------------------
def ours(args) -> dict:
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rmt_peft import MemoryConfig, RMTModel

    report = {"transformers": transformers.__version__, "torch": torch.__version__, "rows": []}
    worst = 0.0
    for arch in ARCHITECTURES:
        saved = load_file(os.path.join(args.out, f"{arch}.safetensors"))
        backbone = AutoModelForCausalLM.from_pretrained(os.path.join(args.out, arch), dtype=torch.float32).eval()
        config = MemoryConfig(num_memory_tokens=MEMORY_TOKENS, segment_size=SEGMENT_SIZE, memory_kind="associative",
                              associative_key_size=KEY_SIZE)
        rmt = RMTModel.from_backbone(backbone, config, verbose=False)
        params = dict(rmt.memory.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[f"param.{name}"])
        ids = saved["input_ids"]
        for n in SEGMENTS:
            x = ids[:, :SEGMENT_SIZE * n]
            for p in params.values():
                p.grad = None
            out = rmt(x, labels=x, return_logits=True)
            out.loss.backward()
            pairs = {"loss": (out.loss.detach().double().reshape(1), saved[f"{n}.loss"]),
                     "logits": (out.logits.detach(), saved[f"{n}.logits"])}
            grads = [(_grad(p), saved[f"{n}.grad.{name}"]) for name, p in params.items()]
            pairs["memory gradients"] = (torch.cat([g.flatten() for g, _ in grads]),
                                         torch.cat([r.flatten() for _, r in grads]))
            for what, (mine, theirs) in pairs.items():
                diff = (mine.double() - theirs.double()).abs().max().item()
                scale = theirs.double().abs().max().item()
                rel = diff / scale if scale else diff
                worst = max(worst, rel)
                report["rows"].append({"model": arch, "segments": n, "what": what, "max_abs_diff": diff,
                                       "max_abs_reference": scale, "relative": rel})
    report["worst_relative"] = worst
    print("| model | segments | compared | max abs difference | largest reference value | relative |")
    print("|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['model']} | {r['segments']} | {r['what']} | {r['max_abs_diff']:.2e} | "
              f"{r['max_abs_reference']:.3g} | {r['relative']:.1e} |")
    with open(os.path.join(args.out, "comparison.json"), "w") as f:
        json.dump(report, f, indent=1)
    tolerance = 1e-4
    verdict = "equal within" if worst <= tolerance else "DIFFERENT beyond"
    print(f"{verdict} a relative {tolerance:g} (worst {worst:.1e}); transformers {report['transformers']}, "
          f"torch {report['torch']}")
    if worst > tolerance:
        raise SystemExit(1)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=["authors", "ours"])
    parser.add_argument("--authors-file", help="the authors' modeling_amt/language_modeling.py (authors side)")
    parser.add_argument("--out", required=True, help="folder shared by the two sides")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.side == "authors":
        if not args.authors_file or not os.path.isfile(args.authors_file):
            parser.error("--authors-file: give the path of the authors' modeling_amt/language_modeling.py")
        authors(args)
    else:
        ours(args)


if __name__ == "__main__":
    main()
