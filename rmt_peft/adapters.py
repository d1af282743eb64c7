"""LoRA on a frozen backbone through peft, with target presets per architecture.

Users pick *what* to adapt ("attention" or "all-linear") rather than each model's module names.
For an architecture without presets, "all-linear" is peft's own keyword (every linear layer but
the output layer) and "attention" asks for explicit target_modules.
``lora_config`` turns a preset name, a dict of ``peft.LoraConfig`` fields or a ready LoraConfig
into a LoraConfig for one architecture; ``attach_lora`` freezes the backbone and adds LoRA;
``trainable_summary`` counts what trains (LoRA, memory, the rest) against the total.
The output layer (lm_head) is never a target: it is tied to the input embedding in most of
these models and adapting it would change the memory's embedding space too.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from .backbones import uses_non_reentrant_checkpointing
from .errors import UserError

PRESETS = ("attention", "all-linear")

# model_type -> preset -> peft target_modules (names are module-name suffixes; a str is a regex)
LORA_TARGETS: dict[str, dict[str, Any]] = {
    "gpt_neo": {"attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
                "all-linear": ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"]},
    "opt": {"attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
            "all-linear": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]},
    # GPT-2 calls both the attention output and the MLP output "c_proj": a regex tells them apart.
    "gpt2": {"attention": r".*\.attn\.(c_attn|c_proj)",
             "all-linear": ["c_attn", "c_proj", "c_fc"]},
    "gpt_neox": {"attention": ["query_key_value", "dense"],
                 "all-linear": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]},
    "llama": {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
              "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
}
# Llama-style models share Llama's module names.
for _name in ("mistral", "qwen2", "qwen3", "gemma", "gemma2"):
    LORA_TARGETS[_name] = LORA_TARGETS["llama"]

# GPT-2 stores its linear layers as Conv1D (weight transposed): peft needs to know.
FAN_IN_FAN_OUT = {"gpt2"}

LORA_DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none"}


def lora_targets(preset: str, architecture: str):
    """peft ``target_modules`` of ``preset`` ("attention" / "all-linear") for ``architecture``."""
    if preset not in PRESETS:
        raise ValueError(f"LoRA preset {preset!r} is not known; allowed: {PRESETS}")
    if architecture not in LORA_TARGETS:
        if preset == "all-linear":  # peft's own keyword: every linear layer but the output layer
            return "all-linear"
        raise ValueError(f"no 'attention' LoRA preset for architecture {architecture!r} (presets: "
                         f"{sorted(LORA_TARGETS)}); use 'all-linear' (peft's) or give target_modules explicitly")
    return LORA_TARGETS[architecture][preset]


def lora_config(preset_or_dict, architecture: str):
    """A peft ``LoraConfig`` for ``architecture`` (a transformers ``model_type``).

    preset_or_dict: a preset name ("attention", "all-linear"); a dict of LoraConfig fields
    where ``target_modules`` may be a preset name (default "attention"; other strings are peft
    regexes, lists are module-name suffixes) and the rest default
    to r=8, lora_alpha=16, lora_dropout=0, bias="none"; or a LoraConfig, returned as it is.
    """
    from peft import LoraConfig

    if isinstance(preset_or_dict, LoraConfig):
        return preset_or_dict
    if isinstance(preset_or_dict, str):
        lora_targets(preset_or_dict, architecture)  # a bare string must be a preset
        fields = {"target_modules": preset_or_dict}
    elif isinstance(preset_or_dict, dict):
        fields = dict(preset_or_dict)
    else:
        raise TypeError(f"lora must be a preset name {PRESETS}, a dict of LoraConfig fields or a LoraConfig, "
                        f"got {type(preset_or_dict).__name__}")
    targets = fields.get("target_modules", "attention")
    if isinstance(targets, str) and targets in PRESETS:
        fields["target_modules"] = lora_targets(targets, architecture)
        if architecture in FAN_IN_FAN_OUT:
            fields.setdefault("fan_in_fan_out", True)
    return LoraConfig(**{**LORA_DEFAULTS, "task_type": "CAUSAL_LM", **fields})


# peft's warnings that say nothing a user can act on: peft reads transformers' deprecated
# ``is_gradient_checkpointing`` whenever it wraps a model, and when saving it looks the base up on
# the Hub to compare vocabularies, which fails offline and for models built from a config (we never
# resize or adapt the embeddings).
PEFT_NOISE = (r"`is_gradient_checkpointing` is deprecated", r"Could not find a config file in ")


@contextlib.contextmanager
def quiet_peft():
    """Silence ``PEFT_NOISE`` (only those warnings) while peft wraps, loads or saves a model."""
    with warnings.catch_warnings():
        for message in PEFT_NOISE:
            warnings.filterwarnings("ignore", message=message)
        yield


def attach_lora(backbone: nn.Module, lora) -> nn.Module:
    """Freeze ``backbone`` and add LoRA (a LoraConfig, a preset name or a dict, see ``lora_config``)."""
    from peft import get_peft_model
    from peft.utils.error import NoMatchingPeftModuleError

    config = lora_config(lora, backbone.config.model_type)
    for p in backbone.parameters():
        p.requires_grad_(False)
    try:
        with quiet_peft():
            model = get_peft_model(backbone, config)
    except NoMatchingPeftModuleError:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in backbone.named_modules()
                         if isinstance(module, (nn.Linear, Conv1D)) or "Linear" in type(module).__name__})
        targets = config.target_modules
        raise UserError(f"lora.target_modules={sorted(targets) if isinstance(targets, set) else targets!r} "
                        f"matches no module of the {backbone.config.model_type} backbone; its linear layers are "
                        f"named {linear} (or use a preset: {list(PRESETS)})") from None
    # peft adds an input-requires-grad hook for (reentrant) checkpointing; non-reentrant
    # checkpointing (load_backbone's) does not need it.
    if uses_non_reentrant_checkpointing(backbone):
        backbone.disable_input_require_grads()
    return model


def parameter_count(param: nn.Parameter) -> int:
    """Number of weights in ``param``; bitsandbytes and ``QuantizedLinear`` pack 4-bit weights (2
    per byte of storage)."""
    if param.__class__.__name__ == "Params4bit" or getattr(param, "packed_4bit", False):
        return param.numel() * 2 * param.element_size()
    return param.numel()


def trainable_summary(model: nn.Module) -> str:
    """One line: trainable parameters (LoRA / memory / other) vs all parameters."""
    groups = {"lora": 0, "memory": 0, "other": 0}
    total = 0
    for name, param in model.named_parameters():
        n = parameter_count(param)
        total += n
        if param.requires_grad:
            group = "lora" if "lora_" in name else "memory" if name.startswith("memory.") else "other"
            groups[group] += n
    trainable = sum(groups.values())
    parts = ", ".join(f"{k} {v:,}" for k, v in groups.items() if v)
    return (f"trainable params: {trainable:,} ({parts or 'none'}) || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")
