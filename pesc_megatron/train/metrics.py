"""Router metrics for logging: aux/z losses per layer and per-layer expert load, reduced over
all ranks. (megatron-core's own reduction averages with ReduceOp.AVG, which gloo lacks.)"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from pesc_megatron.model.pesc_layer import PESCMoELayer
from pesc_megatron.parallel.distributed import device
from pesc_megatron.parallel.mcore_compat import clear_moe_aux_losses, moe_aux_loss_tracker


def pop_router_losses(num_microbatches: int) -> dict[str, torch.Tensor]:
    """Per-layer router losses of the last step ({name: [num_layers]}), averaged over
    micro-batches and data-parallel ranks, summed over the ranks that split a sequence."""
    out = {}
    for name, entry in moe_aux_loss_tracker().items():
        values = entry["values"].clone().float() / num_microbatches
        dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
        if entry.get("reduce_group") is not None:
            dist.all_reduce(values, group=entry["reduce_group"])
        dp = ps.get_data_parallel_group()
        dist.all_reduce(values, group=dp)
        out[name] = values / dist.get_world_size(dp)
    clear_moe_aux_losses()
    return out


def pop_expert_load(model: torch.nn.Module, num_layers: int) -> torch.Tensor:
    """[num_layers, num_experts] fraction of routed tokens per expert since the last call,
    over all ranks (each PESC layer counts the tokens it routed locally)."""
    layers = [m for m in model.modules() if isinstance(m, PESCMoELayer)]
    counts = None
    for layer in layers:
        if counts is None:
            counts = torch.zeros(num_layers, layer.expert_load.numel(), dtype=torch.float64,
                                 device=device())
        counts[layer.layer_number - 1] += layer.expert_load
        layer.expert_load.zero_()
    size = torch.tensor([0 if counts is None else counts.shape[1]], device=device())
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    if counts is None:
        counts = torch.zeros(num_layers, int(size), dtype=torch.float64, device=device())
    dist.all_reduce(counts)  # data-parallel and sequence-parallel ranks route disjoint tokens
    return (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).cpu()
