"""LoRA on a frozen backbone through peft."""
from __future__ import annotations

from torch import nn


def attach_lora(backbone: nn.Module, lora) -> nn.Module:
    """Freeze ``backbone`` and add the LoRA adapters described by a peft ``LoraConfig``."""
    from peft import get_peft_model

    for p in backbone.parameters():
        p.requires_grad_(False)
    return get_peft_model(backbone, lora)
