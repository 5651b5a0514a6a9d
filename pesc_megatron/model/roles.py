"""Which parameters train: PESC trains the routers, the adapter experts and LoRA (if any); the
rest of the model is the frozen base."""
from __future__ import annotations

import torch

from pesc_megatron.model.lora import LoRA
from pesc_megatron.model.pesc_layer import PESCAdapterExperts, PESCRouter

TRAINABLE_MODULES = (PESCRouter, PESCAdapterExperts, LoRA)


def freeze_base(model: torch.nn.Module) -> None:
    """Only the parameters of TRAINABLE_MODULES train (decided by module type, as PEFT does)."""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, TRAINABLE_MODULES):
            module.requires_grad_(True)


def is_trainable(name: str) -> bool:
    """The same rule on a parameter's or a checkpoint key's name (checkpoint files have names,
    not modules); tests/unit/test_pesc_layer.py checks that the two agree."""
    return ".mlp.router." in name or ".mlp.experts." in name or ".lora." in name
