"""Training checkpoints: only what training changes (routers, adapters, optimizer state) through
`dist_checkpointing`, plus `train_state.json` (base checkpoint, iteration, data position,
LR-schedule state, the job's config). Layout in checkpoint/format.py.

Written atomically: everything goes to a hidden `.iter_NNNNNNN.partial-*` folder, which is
renamed to `iter_NNNNNNN` when complete; then `latest` is replaced (write + rename) and folders
beyond `keep_last` are deleted. A crash at any point leaves `latest` naming a whole checkpoint.
RNG: every step reseeds from (train.seed, step), so the step number is the whole RNG state and
a resume draws the same dropout masks as an uninterrupted run.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing

from pesc_megatron.checkpoint import atomic
from pesc_megatron.checkpoint.format import (
    LATEST,
    MEGATRON_TRACKER,
    TRAIN_FORMAT,
    TRAIN_META,
    WEIGHTS,
)
from pesc_megatron.checkpoint.sharded import save_sharded, trainable_sharded_state_dict


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _iteration(folder: Path) -> Optional[int]:
    try:
        return int(folder.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return None


def find_latest(checkpoints: Path) -> Optional[Path]:
    pointer = checkpoints / LATEST
    if not pointer.is_file():
        return None
    folder = checkpoints / pointer.read_text().strip()
    if not (folder / TRAIN_META).is_file():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which is not a complete "
                                "training checkpoint")
    return folder


# Optimizer state keyed by parameter only (no optimizer-index prefix) and, for the distributed
# optimizer, in the format that reloads at any TP/PP/EP/DP (megatron-core's default format is
# rejected by its own checkpoint validation).
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable",
                    "chained_optim_avoid_prefix": True}


def _sharded_state(model, optimizer, is_loading: bool = False) -> dict:
    model_sd = trainable_sharded_state_dict(model)
    return {"model": model_sd, "optimizer": optimizer.sharded_state_dict(
        model_sd, is_loading=is_loading, metadata=OPTIMIZER_FORMAT)}


def save(checkpoints: Path, iteration: int, model, optimizer, train_state: dict,
         keep_last: int, async_queue=None) -> Path:
    """Called on every rank. `train_state` (JSON-able) is written by rank 0. With
    `async_queue` the save completes (and `latest` moves) when the queue finalizes it."""
    rank0 = dist.get_rank() == 0
    target = checkpoints / iter_name(iteration)
    if rank0:
        for stale in checkpoints.glob(".iter_*.partial-*"):  # left by a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)
    state = dict(format=TRAIN_FORMAT, iteration=iteration, **train_state)

    def point_to_it() -> None:  # rank 0, once the folder is complete
        atomic.write_text(checkpoints / LATEST, target.name + "\n")
        atomic.write_text(checkpoints / MEGATRON_TRACKER, f"{iteration}\n")
        # Keep the newest keep_last up to this one; never touch later (abandoned) ones.
        earlier = sorted(p for p in checkpoints.glob("iter_*")
                         if _iteration(p) is not None and _iteration(p) <= iteration)
        for old in earlier[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    save_sharded(target, _sharded_state(model, optimizer), lambda folder: (
        folder / TRAIN_META).write_text(json.dumps(state, indent=2) + "\n"), point_to_it,
        async_queue)
    return target


def load(folder: Path, model, optimizer) -> dict:
    """Loads routers, adapters and optimizer state (at any TP/PP/EP) into `model` and
    `optimizer`; returns the checkpoint's train_state.json."""
    state = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True),
                                    str(folder / WEIGHTS))
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    return json.loads((folder / TRAIN_META).read_text())
