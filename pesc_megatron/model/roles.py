"""Which parameters train: PESC trains the routers, the adapter experts and LoRA (if any); the
rest of the model is the frozen base. The role is decided by module type when the model is
built (as PEFT does) and marked on each parameter as `pesc_role`; checkpoints select their
entries by that mark, not by name."""
from __future__ import annotations

import torch

from pesc_megatron.model.lora import LoRA
from pesc_megatron.model.pesc_layer import PESCAdapterExperts, PESCRouter

ROLES = {PESCRouter: "router", PESCAdapterExperts: "adapter", LoRA: "lora"}


def freeze_base(model: torch.nn.Module) -> None:
    """Marks every parameter of a router, adapter experts or LoRA module with its role and
    makes only those trainable."""
    model.requires_grad_(False)
    for module in model.modules():
        role = next((r for cls, r in ROLES.items() if isinstance(module, cls)), None)
        if role is not None:
            module.requires_grad_(True)
            for p in module.parameters():
                p.pesc_role = role


def role_of(tensor: torch.Tensor, roles: dict[int, str]) -> str | None:
    """The role of the parameter `tensor` is (a view of), from `roles_by_storage`."""
    try:
        return roles.get(tensor.untyped_storage().data_ptr())
    except RuntimeError:  # a wrapper subclass without storage: torchao's FP8 frozen weights
        return None


def roles_by_storage(model: torch.nn.Module) -> dict[int, str]:
    """{storage address: role} of the marked parameters, to find the role of a tensor that
    views one (a checkpoint's sharded tensors are views of the parameters)."""
    return {p.untyped_storage().data_ptr(): p.pesc_role for p in model.parameters()
            if getattr(p, "pesc_role", None)}
