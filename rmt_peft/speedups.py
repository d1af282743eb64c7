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
import torch.nn.functional as F
from torch import nn

from .attention import use_gpt_neo_sdpa
from .errors import UserError


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


# -- flat and fast: what segment checkpointing need not recompute ------------------------------
def _saved_ops() -> set:
    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    return {aten.mm.default, aten.addmm.default, aten.bmm.default,
            *(getattr(aten, n).default for n in names if hasattr(aten, n))}


def save_matmuls_policy(vocab_size: int):
    """A selective-checkpointing policy (``torch.utils.checkpoint.create_selective_checkpoint_contexts``)
    that keeps the outputs of matmuls and attention and recomputes everything else (norms,
    activations, adds, dequantization). The LM head's matmul (``vocab_size`` or the padded
    vocabulary wide) is recomputed: its logits are the largest tensor of a segment."""
    from torch.utils.checkpoint import CheckpointPolicy

    saved, head = _saved_ops(), (vocab_size, vocab_size + (-vocab_size % 64))
    matmuls = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)

    def policy(ctx, op, *args, **kwargs):
        if op in matmuls and args[-1].shape[-1] in head:  # mm(a, b) / addmm(bias, a, b): b's columns
            return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def cache_dequantized_weights(model: nn.Module, enable: bool = True) -> int:
    """Keep a dequantized copy of every 4-bit (bitsandbytes ``Linear4bit``) weight in ``model`` and
    multiply with it, instead of dequantizing each weight on every call (``enable=False`` drops
    the copies). Returns the number of layers changed.

    Why: bitsandbytes dequantizes a weight through Python and ctypes on each call, and RMT calls
    every layer once per segment in forward, again in backward and, with ``checkpoint_segments``,
    in the recompute: NF4 training is CPU-bound. What it costs: the copies in the compute dtype,
    2 bytes per weight (GPT-Neo-1.3B: 2.4 GiB on top of 0.7 GiB of NF4 weights), held while
    enabled. The values are bitsandbytes' own (dequantize, then ``F.linear``: what it does for
    training-sized inputs). The weights are frozen; enable again after changing them. One copy
    for the whole run has the peak of a copy made per step (every layer is used in every
    segment) and keeps compiled blocks from recompiling for a new tensor each step."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    from bitsandbytes.functional import dequantize_4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.__dict__.pop("forward", None)
        layer.__dict__.pop("dequantized_weight", None)
        if not enable:
            continue
        if hasattr(layer.weight, "ds_id"):
            raise UserError("cache_dequantized_weights: the 4-bit weights are partitioned by DeepSpeed ZeRO-3; "
                            "the cache needs whole weights (use ZeRO-2, or no cache)")
        state = layer.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU inference layout
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data,
                                                                                                 state)
        with torch.no_grad():
            weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        # a plain attribute (not a buffer: never saved, never handed to an optimizer or DeepSpeed)
        layer.dequantized_weight = weight.to(layer.compute_dtype or layer.weight.quant_state.dtype)
        layer.forward = _dequantized_forward.__get__(layer)
    return len(layers)


def _dequantized_forward(self, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes.nn.Linear4bit.forward with the weight dequantized once."""
    weight = self.dequantized_weight
    bias = None if self.bias is None else self.bias.to(weight.dtype)
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


# -- streaming: one segment as a CUDA graph --------------------------------------------------
class SegmentGraph:
    """``RMTModel._segment`` without gradients, captured once per input shape as a CUDA graph and
    replayed for every further segment (``rmt.stream(cuda_graph=True)``).

    Reading a long input is one short forward per segment, which leaves the GPU waiting on
    Python (most of all with LoRA attached: peft adds host work to every layer). A replay
    launches the whole segment at once and runs the same kernels on the same values. Only full,
    unpadded segments whose labelled count is known are replayed (the short last one runs
    eagerly). Graphs live as long as the stream: the weights must not change while it reads."""

    def __init__(self, model: nn.Module):
        if not next(model.parameters()).is_cuda:
            raise UserError("cuda_graph=True needs the model on a CUDA device; use cuda_graph=False on "
                            f"{next(model.parameters()).device}")
        self.model = model
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, memory, input_ids, attention_mask, target_ids, want_logits: bool,
                 num_labelled: int | None = None):
        if attention_mask is not None or (target_ids is not None and num_labelled is None):
            return self.model._segment(memory, input_ids, attention_mask, target_ids, want_logits, num_labelled)
        key = (tuple(input_ids.shape), tuple(memory.shape), memory.dtype, target_ids is not None, want_logits,
               num_labelled)
        if key not in self.graphs:
            self.graphs[key] = self._capture(memory, input_ids, target_ids, want_logits, num_labelled)
        graph, inputs, outputs = self.graphs[key]
        for static, value in zip(inputs, (memory, input_ids, target_ids)):
            if static is not None:
                static.copy_(value)
        graph.replay()
        # copies: the next replay overwrites the outputs, and the stream keeps losses for later
        return tuple(None if out is None else out.clone() for out in outputs)

    def _capture(self, memory, input_ids, target_ids, want_logits, num_labelled):
        inputs = tuple(None if t is None else t.clone() for t in (memory, input_ids, target_ids))

        def run():
            return self.model._segment(inputs[0], inputs[1], None, inputs[2], want_logits, num_labelled)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy initialisation, compiling
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = run()
        return graph, inputs, outputs
