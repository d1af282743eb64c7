"""Optional speed-ups for a loaded backbone that keep its function, measured in BENCHMARKS.md.

- ``use_fused_gelu``: transformers' "gelu_new" (GPT-Neo, GPT-2) is eight elementwise kernels, each
  saving a full (tokens, 4 x hidden) tensor for backward; torch's tanh-approximate GELU is the same
  formula in one kernel. Training activations of GPT-Neo-1.3B drop by about a third.
- ``compile_blocks``: ``torch.compile`` of each transformer block (not the whole model, so the
  segment loop, checkpointing and masks stay eager). RMT runs many short forwards, so Python and
  kernel-launch overhead dominates at small batches; compiled blocks remove most of it.
- ``compile_body``: ``torch.compile`` of the decoder body whole (every block with its hooks, the
  final norm): one compiled call a segment instead of one a layer, so the host work a layer call
  costs is paid once a segment. Longer to compile (the layers are unrolled into one graph).
- ``memory_budget`` of either (``compiled_call``): the compiled graphs keep part of their
  activations and recompute the rest in backward; ``checkpoint_segments="auto"`` lowers it.
- ``use_gpt_neo_sdpa`` (rmt_peft.attention): the exact SDPA attention path for GPT-Neo.

The exact ones (SDPA for GPT-Neo, the fused GELU, and the padded LM head inside ``RMTModel``) are
on by default: ``load_backbone`` and ``RMTModel.from_backbone`` apply them, and
``speedups=False`` in either keeps the model as transformers computes it. Compiled blocks are
one argument away (``from_backbone(..., compile=True)``) and on by default in recipes on a GPU.

``speed_up(model)`` applies all that apply. Each function returns how many modules it changed.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .associative import AssociativeState
from .attention import GPT_NEO_SDPA, use_gpt_neo_sdpa
from .errors import UserError
from .quantized_linear import QuantizedLinear


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
RECOMPILE_LIMIT = 64  # graphs kept for the blocks' compiled call (compile_blocks)


def compile_blocks(model: nn.Module, enable: bool = True, memory_budget: float = 1.0, **compile_kwargs) -> int:
    """``torch.compile`` each transformer block in place (``enable=False`` undoes it). The first
    call of each new input shape compiles (tens of seconds on a GPU); later calls reuse it.

    The block's hooks compile with it (an associative memory's read and write): one graph a layer
    call, the same graph for every layer of a kind.

    With a CUDA-graph mode (``mode="reduce-overhead"`` or ``"max-autotune"``) the graphs serve
    training calls only: without gradients, torch's graph trees overwrite a block's output while
    the next block still reads it (a RuntimeError when streaming or evaluating), so calls under
    ``torch.no_grad`` run the block eagerly.

    ``memory_budget`` < 1: each compiled graph keeps at most about that share of the activations
    it would keep for backward and recomputes the rest in backward, cheapest first (torch's
    ``activation_memory_budget``, decided when the graph compiles): a segment's activations
    shrink with less recompute than checkpointing the whole segment costs (``compiled_call``)."""
    blocks = transformer_blocks(model)
    if enable and compiled_scope(model) == "body":  # the two never nest
        compile_body(model, enable=False)
    compiled = compiled_call(memory_budget, **compile_kwargs) if enable else None
    if enable:
        # Every block shares one compiled function, whose graphs are kept per layer kind (GPT-Neo:
        # global / local attention), with or without gradients, per segment length (a short last
        # one) and, with an associative memory, per first / later segment: up to 32, where
        # torch's default of 8 would leave the rest of the blocks eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        if not enable:
            block._compiled_call_impl = None
        elif compile_kwargs.get("mode") in CUDA_GRAPH_MODES:
            block._compiled_call_impl = _graphs_with_grad(block, partial(compiled, block))
        else:
            block._compiled_call_impl = partial(compiled, block)
    return len(blocks)


def compiled_call(memory_budget: float = 1.0, **compile_kwargs):
    """``torch.compile(_call_block, **compile_kwargs)``; with ``memory_budget`` < 1, through
    inductor with ``torch._functorch.config.activation_memory_budget`` set while each graph
    compiles (its forward / backward split is decided then), so it holds for these graphs only."""
    if not isinstance(memory_budget, (int, float)) or isinstance(memory_budget, bool) or not 0 < memory_budget <= 1:
        raise UserError(f"memory_budget={memory_budget!r} is invalid: expected a number in (0, 1] (1 = keep every "
                        "activation the compiled graphs would keep)")
    if memory_budget == 1:
        return torch.compile(_call_block, **compile_kwargs)
    backend = compile_kwargs.pop("backend", "inductor")
    if backend != "inductor":
        raise UserError(f"memory_budget={memory_budget} needs torch.compile's inductor backend (got {backend!r}): "
                        "the budget is applied where inductor splits forward and backward")
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    mode = compile_kwargs.pop("mode", None)
    patches = {**(list_mode_options(mode) if mode else {}), **compile_kwargs.pop("options", {})}

    def budgeted(graph, example_inputs):
        with torch._functorch.config.patch(activation_memory_budget=memory_budget):
            return compile_fx(graph, example_inputs, config_patches=patches)

    return torch.compile(_call_block, backend=budgeted, **compile_kwargs)


def _call_block(block: nn.Module, *args, **kwargs):
    """A block's call, hooks included, as ``compile_blocks`` compiles it. Compiled from the block's
    own ``_call_impl`` (``nn.Module.compile``), dynamo starts tracing at ``forward`` and compiles
    each hook as a graph of its own: with an associative memory, three compiled calls a layer
    forward and three backward, and the step was host bound (1.7x the memory of tokens' step on
    an H200, BENCHMARKS.md). The block is an argument, not a constant, so its layers share graphs."""
    return block._call_impl(*args, **kwargs)


def blocks_compiled(model: nn.Module) -> bool:
    """Whether ``compile_blocks`` compiled any decoder block of ``model``."""
    return any(getattr(block, "_compiled_call_impl", None) is not None for block in transformer_blocks(model))


COMPILE_SCOPES = ("blocks", "body")


def decoder_body(model: nn.Module) -> nn.Module:
    """The decoder stack under ``model``'s LM head (GPT-Neo / GPT-2: ``transformer``, OPT / Llama:
    ``model``): what ``RMTModel`` calls once a segment."""
    from transformers import PreTrainedModel

    lms = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    if not lms:
        raise UserError(f"compile_body: {type(model).__name__} holds no transformers model")
    return lms[0].base_model


def compile_body(model: nn.Module, enable: bool = True, memory_budget: float = 1.0, **compile_kwargs) -> int:
    """``torch.compile`` the decoder body of ``model`` whole, its blocks' hooks included (an
    associative memory's read and write), in place (``enable=False`` undoes it); undoes
    ``compile_blocks`` first, so the two never nest. Returns the number of blocks inside.

    One compiled call a segment instead of one a layer: a step's host work (Python, guards and
    launches between the blocks) is paid once a segment, and with a CUDA-graph mode a step
    records one graph a segment instead of one a layer. The price is compile time: the layers
    are unrolled into one graph, so each new shape (a short last segment, evaluation without
    gradients, an associative memory's first segment) compiles the whole stack again. With a
    CUDA-graph mode, calls under ``torch.no_grad`` run eagerly, and ``memory_budget`` acts, as for
    ``compile_blocks``."""
    body = decoder_body(model)
    compile_blocks(model, enable=False)
    body._compiled_call_impl = None
    if enable:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        compiled = partial(compiled_call(memory_budget, **compile_kwargs), body)
        graphs = compile_kwargs.get("mode") in CUDA_GRAPH_MODES
        body._compiled_call_impl = _graphs_with_grad(body, compiled) if graphs else compiled
    return len(transformer_blocks(body))


def compiled_scope(model: nn.Module) -> str | None:
    """Which part of ``model`` is compiled: "blocks", "body" or None."""
    if blocks_compiled(model):
        return "blocks"
    try:
        body = decoder_body(model)
    except UserError:
        return None
    return "body" if getattr(body, "_compiled_call_impl", None) is not None else None


def _graphs_with_grad(block: nn.Module, compiled):
    def call(*args, **kwargs):
        if torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return block._call_impl(*args, **kwargs)

    return call


def speed_up(model: nn.Module, compile: bool | str = False, enable: bool = True,
             compile_scope: str = "blocks", memory_budget: float = 1.0) -> dict[str, int]:
    """Apply the exact SDPA attention (GPT-Neo), the fused GELU and, if asked, the compile
    (``compile``: True, or a torch.compile mode such as "reduce-overhead") of each block
    (``compile_scope="blocks"``, ``compile_blocks``) or of the decoder body whole ("body",
    ``compile_body``), its graphs at activation ``memory_budget`` (``compiled_call``).
    ``enable=False`` undoes the SDPA attention and the fused GELU
    (``compile_blocks`` / ``compile_body(model, enable=False)`` undo the compile)."""
    if compile_scope not in COMPILE_SCOPES:
        raise UserError(f"compile_scope={compile_scope!r} is not allowed; allowed: {list(COMPILE_SCOPES)}")
    done = {"gpt_neo_sdpa": use_gpt_neo_sdpa(model, enable), "fused_gelu": use_fused_gelu(model, enable)}
    if compile:
        done[f"compiled_{compile_scope}"] = compile_model(model, compile, compile_scope, memory_budget)
    return done


def compile_model(model: nn.Module, compile: bool | str, scope: str = "blocks", memory_budget: float = 1.0) -> int:
    """``compile_blocks`` or ``compile_body`` (``scope``) with ``compile`` (True or a torch.compile
    mode) at ``memory_budget``; what ``speed_up`` compiles, and what checkpoint_segments="auto"
    compiles again when it lowers the budget."""
    kwargs = {"mode": compile} if isinstance(compile, str) else {}
    if memory_budget != 1:
        kwargs["memory_budget"] = memory_budget
    return (compile_body if scope == "body" else compile_blocks)(model, **kwargs)


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
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.__dict__.pop("forward", None)
        layer.__dict__.pop("dequantized_weight", None)
        if not enable:
            continue
        if hasattr(layer.weight, "ds_id"):
            raise UserError("cache_dequantized_weights: the 4-bit weights are partitioned by DeepSpeed ZeRO-3; "
                            "the cache needs whole weights (use ZeRO-2, or no cache)")
        weight = _dequantize(layer)
        # a plain attribute (not a buffer: never saved, never handed to an optimizer or DeepSpeed)
        layer.dequantized_weight = weight.to(layer.compute_dtype or layer.weight.quant_state.dtype)
        layer.forward = _dequantized_forward.__get__(layer)
    return len(layers)


# The cache is on by default where it costs at most this share of the GPU's memory: GPT-Neo-1.3B
# on an H200 takes 1.7% (1.36-1.80x faster, BENCHMARKS.md), a 7B model on an 80 GB GPU 17% (off:
# 4-bit was chosen to fit it).
AUTO_CACHE_SHARE = 0.10


def dequantized_cache_bytes(model: nn.Module) -> tuple[int, torch.device | None]:
    """Bytes the dequantized copies of ``model``'s 4-bit weights would take, and their device."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0, None
    total, device = 0, None
    for layer in model.modules():
        if isinstance(layer, Linear4bit):
            state = layer.weight.quant_state
            total += state.shape.numel() * (layer.compute_dtype or state.dtype).itemsize
            device = layer.weight.device
    return total, device


def cache_pays(model: nn.Module, share: float = AUTO_CACHE_SHARE) -> tuple[bool, str | None]:
    """Whether the default (``cache_dequantized=None``) turns the dequantized-weight cache on:
    4-bit weights on a CUDA GPU, whole (not ZeRO-3 partitions), whose copies take at most
    ``share`` of the GPU's memory. Returns the decision and why, for the log (None: no 4-bit
    weights, nothing to say)."""
    size, device = dequantized_cache_bytes(model)
    if not size:
        return False, None
    if device.type != "cuda":
        return False, f"4-bit weights on {device.type}, not a CUDA GPU"
    if _zero3_partitioned(model):
        return False, "weights partitioned by DeepSpeed ZeRO-3"
    return _small_share(size, device, share)


def _small_share(size: int, device: torch.device, share: float) -> tuple[bool, str]:
    gpu = torch.cuda.get_device_properties(device).total_memory
    verdict = "on" if size <= share * gpu else "off"
    return verdict == "on", (f"{verdict}: the copies take {size / 2**30:.2f} GiB, {100 * size / gpu:.1f}% of the "
                             f"GPU's {gpu / 2**30:.0f} GiB (on up to {100 * share:.0f}%)")


@torch.no_grad()
def _dequantize(layer: nn.Module) -> torch.Tensor:
    """A bitsandbytes ``Linear4bit``'s weight, dequantized (in its quantization dtype)."""
    from bitsandbytes.functional import dequantize_4bit

    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU inference layout
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
    return dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def _dequantized_forward(self, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes.nn.Linear4bit.forward with the weight dequantized once."""
    weight = self.dequantized_weight
    bias = None if self.bias is None else self.bias.to(weight.dtype)
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


# -- streaming: LoRA merged into copies of the weights ------------------------------------------
def _mergeable_lora_layers(model: nn.Module) -> list[nn.Module]:
    """peft LoRA layers over a plain or 4-bit linear layer, plain LoRA (no DoRA or other variant),
    not merged and not disabled: those ``merged_lora_weights`` can fold."""
    from peft.tuners.lora import LoraLayer

    try:
        from bitsandbytes.nn import Linear4bit
        linear_types: tuple = (nn.Linear, Linear4bit)
    except ImportError:
        linear_types = (nn.Linear,)
    return [m for m in model.modules()
            if isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), linear_types) and not m.merged
            and not m.disable_adapters and not getattr(m, "lora_variant", {}) and not any(m.use_dora.values())
            and not getattr(m, "fan_in_fan_out", False)]


def merged_lora_bytes(model: nn.Module) -> tuple[int, torch.device | None]:
    """Bytes ``merged_lora_weights`` would hold, and the weights' device."""
    layers = _mergeable_lora_layers(model)
    total = sum(m.out_features * m.in_features * _merged_itemsize(m.get_base_layer()) for m in layers)
    return total, (layers[0].get_base_layer().weight.device if layers else None)


def merge_pays(model: nn.Module, share: float = AUTO_CACHE_SHARE) -> tuple[bool, str | None]:
    """The default of ``rmt.stream(merge_lora=None)``: on for a model in eval mode whose LoRA
    layers sit on a CUDA GPU and whose merged copies take at most ``share`` of its memory.
    Returns the decision and why (None: no LoRA layers, nothing to say)."""
    size, device = merged_lora_bytes(model)
    if not size:
        return False, None
    if model.training:
        return False, "the model is in training mode (LoRA dropout)"
    if _zero3_partitioned(model):
        return False, "weights partitioned by DeepSpeed ZeRO-3"
    if device.type != "cuda":
        return False, f"weights on {device.type}, not a CUDA GPU"
    return _small_share(size, device, share)


def _zero3_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _merged_itemsize(base: nn.Module) -> int:
    """Bytes per weight of a merged copy: FP8 layers keep theirs in FP8 (``merged_lora_weights``)."""
    return 1 if getattr(base, "format", None) == "fp8" else _compute_dtype(base).itemsize


def _compute_dtype(base: nn.Module) -> torch.dtype:
    if isinstance(base, QuantizedLinear):
        return base.compute_dtype
    state = getattr(base.weight, "quant_state", None)
    return (getattr(base, "compute_dtype", None) or state.dtype) if state is not None else base.weight.dtype


@torch.no_grad()
def merged_lora_weights(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """For each LoRA layer ``merged_lora_view`` can fold, a frozen copy that computes it with its
    adapters folded in: its base weight (dequantized if quantized) plus ``scaling * B @ A`` of the
    active adapters, summed in fp32 and rounded once to the layer's compute dtype (what
    ``merge_and_unload`` gives), with its bias, as a ``MergedLinear``; for an FP8 layer, a
    ``QuantizedLinear`` of that sum in FP8 (1 byte per weight, matmuls at FP8 rate). The model is
    unchanged."""
    if _zero3_partitioned(model):  # a rank holds a slice of each weight: a copy of it would be a slice too
        raise UserError("merge_lora=True: the weights are partitioned by DeepSpeed ZeRO-3, and merged copies need "
                        "whole weights; stream with merge_lora=False (peft's own layers, gathered by ZeRO-3's hooks)")
    out = {}
    for layer in _mergeable_lora_layers(model):
        base = layer.get_base_layer()
        dtype = _compute_dtype(base)
        if hasattr(base, "dequantized_weight"):
            weight = base.dequantized_weight
        elif isinstance(base, QuantizedLinear):
            weight = base.dequantize()
        elif getattr(base.weight, "quant_state", None) is not None:
            weight = _dequantize(base)
        else:
            weight = base.weight
        weight = weight.float()
        for name in layer.active_adapters:
            if name in layer.lora_A:
                weight = weight + layer.get_delta_weight(name).float()
        bias = None if base.bias is None else base.bias.to(dtype)
        if getattr(base, "format", None) == "fp8":  # quantized again: the stream keeps FP8's matmul rate
            out[layer] = QuantizedLinear(weight.to(dtype), bias, "fp8")
        else:
            out[layer] = MergedLinear(weight.to(dtype), bias)
    return out


class MergedLinear(nn.Module):
    """A LoRA layer's merged copy (``merged_lora_weights``): one matmul in the copy's dtype, the
    input cast to it and the result back to the input's dtype (a 4-bit layer's copy is in its
    compute dtype, which its input need not share)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        # buffers: they move with the copy and are never trained
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def merged_lora_key(model: nn.Module) -> tuple:
    """What ``merged_lora_weights(model)`` depends on: each foldable layer, its active adapters,
    and where each of its tensors lives and its version (an in-place update, as an optimizer step
    makes, or a move to another device changes it). Equal keys: the same merged copies."""
    return tuple((id(layer), tuple(layer.active_adapters),
                  tuple((p.data_ptr(), p._version, p.dtype) for p in layer.parameters()))
                 for layer in _mergeable_lora_layers(model))


class merged_lora_view:
    """``with merged_lora_view(model, copies):`` each LoRA layer of ``model`` in ``copies``
    (``merged_lora_weights``) is replaced in its parent module by its merged copy, one matmul
    instead of the base matmul plus LoRA's four kernels; the layers are put back on exit. Reading
    with LoRA attached then runs at the speed of a merged model without merging it (the model
    stays trainable, its weights untouched). Hooks on the LoRA layers do not run inside the view
    (``stream(merge_lora=False)`` keeps them).

    The copies take the layers' places rather than their ``forward``s: compiled blocks then meet
    modules of one type in every block and share their graphs across the blocks. A forward of
    each layer's own was a new object to their guards in every block: one graph per block and
    segment length (48 for GPT-Neo-1.3B's stream), past torch's recompile limit once another
    model's graphs were in the process, where the rest of the blocks ran uncompiled."""

    def __init__(self, model: nn.Module, copies: dict[nn.Module, nn.Module]):
        self.copies = copies
        # (parent, name, LoRA layer, copy), found once: the stream enters the view every segment
        self._places = [(parent, name, child, copies[child]) for parent in (model.modules() if copies else ())
                        for name, child in parent._modules.items() if child in copies]

    def __enter__(self):
        for parent, name, _, copy in self._places:
            parent._modules[name] = copy
        return self

    def __exit__(self, *exc):
        for parent, name, layer, _ in self._places:
            parent._modules[name] = layer


# -- streaming: one segment as a CUDA graph --------------------------------------------------
# The default stream (cuda_graph=None) reads this many full segments eagerly before it captures:
# a capture costs about three segments (two warm-up runs and the capture), which a stream of a
# few segments (one document of an evaluation) would not win back.
GRAPH_AFTER_SEGMENTS = 16


def compiled_capture_blocker(model: nn.Module) -> str | None:
    """Why compiled code in ``model`` must not be captured in a stream's CUDA graph (None: nothing
    compiled, or blocks that capture). A graph compiled inside a capture fails it and leaves the
    CUDA context unusable. Compiled blocks capture on GPT-Neo's SDPA path, which builds no mask in
    a capture (``attention.unpacked_rows``); elsewhere transformers builds one there that the
    blocks never saw, and they would compile again. A decoder body compiled whole, and blocks
    compiled with an associative memory's hooks, are not known to capture (not tried on a GPU)."""
    scope = compiled_scope(model)
    if scope == "body":
        return "the decoder body is compiled (not known to capture)"
    if scope == "blocks" and getattr(getattr(model, "memory_config", None), "associative", False):
        return "the blocks are compiled with an associative memory's read and write (not known to capture)"
    if scope == "blocks" and not any(getattr(getattr(m, "config", None), "_attn_implementation", None) == GPT_NEO_SDPA
                                     for m in model.modules()):
        return ("the blocks are compiled, and transformers builds their attention mask anew inside a capture "
                "(only GPT-Neo's SDPA path keeps it out)")
    return None


def graph_blocker(model: nn.Module, merged: dict) -> str | None:
    """Why a stream of ``model`` should not capture its segments (None: nothing against it).
    ``merged``: the LoRA layers the stream reads through merged copies (``merged_lora_view.copies``).
    Compiled code that would compile again inside the capture (``compiled_capture_blocker``), and
    bitsandbytes layers that compute themselves (8-bit, or 4-bit without a dequantized copy),
    which are not known to capture, are left eager."""
    compiled = compiled_capture_blocker(model)
    if compiled:
        return compiled
    try:
        from bitsandbytes.nn import Linear4bit, Linear8bitLt
    except ImportError:
        return None
    covered = {id(layer.get_base_layer()) for layer in merged}
    for module in model.modules():
        if isinstance(module, Linear8bitLt):
            return "8-bit bitsandbytes layers"
        if isinstance(module, Linear4bit) and id(module) not in covered and not hasattr(module, "dequantized_weight"):
            return "4-bit layers without dequantized copies (from_backbone(cache_dequantized=True) adds them)"
    return None


def graph_pays(model: nn.Module, merged: dict) -> tuple[bool, str | None]:
    """The default of ``rmt.stream(cuda_graph=None)``: on for a model in eval mode on a CUDA GPU
    that ``graph_blocker`` finds nothing against, after ``GRAPH_AFTER_SEGMENTS`` eager segments.
    Returns the decision and why (None: not on a GPU, nothing to say)."""
    if not next(model.parameters()).is_cuda:
        return False, None
    if model.training:
        return False, "off: the model is in training mode (dropout)"
    blocker = graph_blocker(model, merged)
    if blocker:
        return False, f"off: {blocker}"
    return True, f"on from segment {GRAPH_AFTER_SEGMENTS + 1}"


class SegmentGraph:
    """``RMTModel._segment`` without gradients, captured once per input shape as a CUDA graph and
    replayed for every further segment (``rmt.stream(cuda_graph=True)``).

    Reading a long input is one short forward per segment, which leaves the GPU waiting on
    Python (most of all with LoRA attached: peft adds host work to every layer). A replay
    launches the whole segment at once and runs the same kernels on the same values. Only full,
    unpadded segments whose labelled count is known are replayed (the short last one runs
    eagerly). Graphs live as long as the stream: the weights must not change while it reads."""

    def __init__(self, model: nn.Module):
        blocker = compiled_capture_blocker(model)
        if blocker:
            # a compile inside the capture fails it (cudaErrorStreamCaptureInvalidated) for good
            scope = compiled_scope(model)
            raise UserError(f"cuda_graph=True cannot capture this model: {blocker}; a compile inside the capture "
                            "fails it and leaves the GPU context broken. Stream with cuda_graph=False, or undo the "
                            f"compile (rmt_peft.speedups.compile_{scope}(rmt.causal_lm, enable=False))")
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
        flat = _memory_tensors(memory)
        key = (tuple(input_ids.shape), tuple((tuple(t.shape), t.dtype) for t in flat),
               getattr(memory, "empty", None), target_ids is not None, want_logits, num_labelled)
        if key not in self.graphs:
            self.graphs[key] = self._capture(memory, input_ids, target_ids, want_logits, num_labelled)
        graph, inputs, outputs, new_memory = self.graphs[key]
        for static, value in zip(inputs, (*flat, input_ids, target_ids)):
            if static is not None:
                static.copy_(value)
        graph.replay()
        # copies: the next replay overwrites the outputs, and the stream keeps losses for later
        outputs = [None if out is None else out.clone() for out in outputs]
        k = len(outputs) - 3
        return (_memory_like(new_memory, outputs[:k]), *outputs[k:])

    def _capture(self, memory, input_ids, target_ids, want_logits, num_labelled):
        flat = _memory_tensors(memory)
        inputs = tuple(None if t is None else t.clone() for t in (*flat, input_ids, target_ids))
        k = len(flat)

        def run():
            return self.model._segment(_memory_like(memory, inputs[:k]), inputs[k], None, inputs[k + 1],
                                       want_logits, num_labelled)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy initialisation, compiling
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            new_memory, *rest = run()
        return graph, inputs, (*_memory_tensors(new_memory), *rest), new_memory


def _memory_tensors(memory) -> tuple[torch.Tensor, ...]:
    """The tensors of a memory state: the token memory itself, or an associative state's."""
    return memory.tensors() if isinstance(memory, AssociativeState) else (memory,)


def _memory_like(template, tensors):
    """A memory state of ``template``'s kind holding ``tensors`` (see ``_memory_tensors``)."""
    return template.with_tensors(tensors) if isinstance(template, AssociativeState) else tensors[0]
