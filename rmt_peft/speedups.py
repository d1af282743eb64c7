"""Optional speed-ups for a loaded backbone that keep its function, measured in BENCHMARKS.md.

- ``use_fused_gelu``: transformers' "gelu_new" (GPT-Neo, GPT-2) is eight elementwise kernels, each
  saving a full (tokens, 4 x hidden) tensor for backward; torch's tanh-approximate GELU is the same
  formula in one kernel. Training activations of GPT-Neo-1.3B drop by about a third.
- ``compile_blocks``: ``torch.compile`` of each transformer block (not the whole model, so the
  segment loop, checkpointing and masks stay eager). RMT runs many short forwards, so Python and
  kernel-launch overhead dominates at small batches; compiled blocks remove most of it.
- ``use_gpt_neo_sdpa`` (rmt_peft.attention): the exact SDPA attention path for GPT-Neo.

The exact ones (SDPA for GPT-Neo, the fused GELU, and the padded LM head inside ``RMTModel``) are
on by default: ``load_backbone`` and ``RMTModel.from_backbone`` apply them, and
``speedups=False`` in either keeps the model as transformers computes it. Compiled blocks are
one argument away (``from_backbone(..., compile=True)``) and on by default in recipes on a GPU.

``speed_up(model)`` applies all that apply. Each function returns how many modules it changed.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import use_gpt_neo_sdpa


class FusedTanhGelu(nn.GELU):
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` in one kernel (transformers' NewGELUActivation)."""

    def __init__(self):
        super().__init__(approximate="tanh")


def use_fused_gelu(model: nn.Module, enable: bool = True) -> int:
    """Swap every ``NewGELUActivation`` inside ``model`` for ``FusedTanhGelu`` (``enable=False`` restores)."""
    from transformers.activations import NewGELUActivation

    source, target = (NewGELUActivation, FusedTanhGelu) if enable else (FusedTanhGelu, NewGELUActivation)
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is source:
                setattr(module, name, target())
                swapped += 1
    return swapped


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder layers of a transformers model (plain, quantized or inside peft)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_blocks(model: nn.Module, enable: bool = True, **compile_kwargs) -> int:
    """``torch.compile`` each transformer block in place (``enable=False`` undoes it). The first
    call of each new input shape compiles (tens of seconds on a GPU); later calls reuse it.

    With a CUDA-graph mode (``mode="reduce-overhead"`` or ``"max-autotune"``) the graphs serve
    training calls only: without gradients, torch's graph trees overwrite a block's output while
    the next block still reads it (a RuntimeError when streaming or evaluating), so calls under
    ``torch.no_grad`` run the block eagerly."""
    blocks = transformer_blocks(model)
    for block in blocks:
        if not enable:
            block._compiled_call_impl = None
        elif compile_kwargs.get("mode") in CUDA_GRAPH_MODES:
            block._compiled_call_impl = _graphs_with_grad(block, torch.compile(block._call_impl, **compile_kwargs))
        else:
            block.compile(**compile_kwargs)
    return len(blocks)


def _graphs_with_grad(block: nn.Module, compiled):
    def call(*args, **kwargs):
        if torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return block._call_impl(*args, **kwargs)

    return call


def speed_up(model: nn.Module, compile: bool | str = False, enable: bool = True) -> dict[str, int]:
    """Apply the exact SDPA attention (GPT-Neo), the fused GELU and, if asked, compiled blocks
    (``compile``: True, or a torch.compile mode such as "reduce-overhead"). ``enable=False``
    undoes the SDPA attention and the fused GELU (``compile_blocks(model, enable=False)`` undoes
    the compile)."""
    done = {"gpt_neo_sdpa": use_gpt_neo_sdpa(model, enable), "fused_gelu": use_fused_gelu(model, enable)}
    if compile:
        done["compiled_blocks"] = compile_blocks(model, **({"mode": compile} if isinstance(compile, str) else {}))
    return done

