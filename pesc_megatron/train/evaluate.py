"""The mean loss over the loss tokens of a dataset, at any parallel layout (`pesc eval` and the
validation passes of `pesc train`)."""
from __future__ import annotations

import math

import torch
from megatron.core import parallel_state as ps

from pesc_megatron.data import collate
from pesc_megatron.train.step import forward_only, last_stage_sum


def padding_item(dataset) -> dict:
    """A sequence with no loss token, to fill the last evaluation step."""
    item = dict(dataset[0])
    item["loss_mask"] = torch.zeros_like(item["loss_mask"])
    return item


def evaluate(model, dataset, micro_batch_size: int) -> tuple[float, int]:
    """(mean loss over all loss tokens of `dataset`, number of loss tokens)."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    num_mb = max(1, math.ceil(len(dataset) / (micro_batch_size * dp)))
    per_rank = num_mb * micro_batch_size
    pad = padding_item(dataset)
    items = [dataset[i] if i < len(dataset) else pad
             for i in range(rank * per_rank, (rank + 1) * per_rank)]
    batches = [collate(items[j:j + micro_batch_size]) for j in range(0, per_rank,
                                                                       micro_batch_size)]
    stats = forward_only(model, batches, dataset.seq_length, micro_batch_size)
    loss_sum = last_stage_sum(None if stats is None else stats["loss_sum"])
    tokens = last_stage_sum(None if stats is None else stats["tokens"])
    return (loss_sum / tokens.clamp(min=1)).item(), int(tokens.round().item())
