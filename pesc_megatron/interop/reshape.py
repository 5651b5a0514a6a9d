"""The tensor side of the mapping rules (interop/mapping.py): `to_megatron` fuses a rule's
Hugging Face tensors into its megatron-core tensor, `to_hf` splits it back."""
from __future__ import annotations

import torch

from pesc_megatron.model.config import ModelConfig


def to_megatron(kind: str, tensors: list[torch.Tensor], model: ModelConfig) -> torch.Tensor:
    if kind == "copy":
        return tensors[0]
    if kind == "gate_up":
        return torch.cat(tensors, dim=0)
    # qkv: per query group, that group's q heads then its k head then its v head.
    q, k, v = tensors
    groups, d = model.num_key_value_heads, model.head_dim
    tail = q.shape[1:]
    q = q.reshape(groups, -1, *tail)
    k, v = k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def to_hf(kind: str, tensor: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
    if kind == "copy":
        return [tensor]
    if kind == "gate_up":
        return list(tensor.chunk(2, dim=0))
    groups, d = model.num_key_value_heads, model.head_dim
    per_group = model.num_attention_heads // groups * d
    tail = tensor.shape[1:]
    q, k, v = tensor.reshape(groups, per_group + 2 * d, *tail).split([per_group, d, d], dim=1)
    return [x.reshape(-1, *tail).contiguous() for x in (q, k, v)]
