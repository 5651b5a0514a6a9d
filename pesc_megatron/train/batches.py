"""The training data as global batches: built once by rank 0 (the others read its token
cache; a node with a node-local cache builds its own), ordered independently of the parallel layout, split into this rank's micro-batches."""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np
import torch.distributed as dist
from megatron.core import parallel_state as ps

from pesc_megatron.data import DataError, build_dataset, collate
from pesc_megatron.parallel.distributed import is_rank0
from pesc_megatron.train.config import JobConfig

# How long the other ranks wait for a cold build. Tokenising a million conversations takes 5 to
# 30 minutes on 2 cores (docs/data.md), more with more data or fewer workers: not a hang for
# `train.dist_timeout_minutes` (default 60) to catch. A building rank that dies still ends the
# job at once (its sockets close; torchrun stops the others).
BUILD_TIMEOUT = datetime.timedelta(hours=24)


def build_data(files: list, tokenizer, job: JobConfig, cache_dir: Path, packing: bool):
    """Rank 0 tokenises (or reads the cache), then the others read its cache. On another node
    whose local rank 0 does not see rank 0's cache (a node-local cache_dir), that rank builds
    the node's own copy first. A data error on a building rank is sent to every rank, so that
    all of them stop with the same message. The ranks wait for the builds on a gloo group of
    their own, with `BUILD_TIMEOUT`."""
    d = job.data
    kwargs = dict(seq_length=d.seq_length, packing=packing, cache_dir=cache_dir,
                  on_error=d.on_error, overlong=d.overlong, seed=job.train.seed,
                  loss_on=d.loss_on, num_workers=d.num_workers)
    dataset = None

    def build() -> list:
        nonlocal dataset
        try:
            dataset = build_dataset(files, tokenizer, builder=True, **kwargs)
        except DataError as e:
            return [str(e)]
        except OSError as e:  # e.g. an unwritable cache_dir: still stop every rank
            return [f"{e.filename or cache_dir}: {e.strerror or e}"]
        return [None]

    group = dist.new_group(backend="gloo", timeout=BUILD_TIMEOUT)
    try:
        error = build() if is_rank0() else [None]
        dist.broadcast_object_list(error, src=0, group=group)
        if error[0] is not None:
            raise DataError("", error[0])
        # builds only what this node is missing: nothing where cache_dir is shared
        local0 = not is_rank0() and int(os.environ.get("LOCAL_RANK", 0)) == 0
        mine = build() if local0 else [None]
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, mine[0], group=group)
        if any(errors):
            raise DataError("", next(e for e in errors if e))
    finally:
        dist.destroy_process_group(group)
    if dataset is None:
        dataset = build_dataset(files, tokenizer, builder=False, **kwargs)
    return dataset


class GlobalBatches:
    """Global batch k holds the sequences at positions [k*gbs, (k+1)*gbs) of the endless
    stream of epochs, each epoch a permutation seeded by (seed, epoch). The order does not
    depend on the parallel layout, so with the same batch size and data (checked on resume)
    the data position is the step."""

    def __init__(self, dataset, global_batch_size: int, seed: int):
        self.dataset, self.gbs, self.seed = dataset, global_batch_size, seed
        self._epoch, self._order_of_epoch = None, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order_of_epoch = np.random.default_rng([self.seed, epoch]).permutation(
                len(self.dataset))
        return self._order_of_epoch

    def indices(self, step: int) -> list[int]:
        n = len(self.dataset)
        return [int(self._order(p // n)[p % n]) for p in range(step * self.gbs,
                                                               (step + 1) * self.gbs)]


def rank_micro_batches(dataset, indices: list[int], micro_batch_size: int) -> list[dict]:
    """This data-parallel rank's consecutive slice of `indices`, as micro-batches."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = len(indices) // dp
    mine = indices[rank * per_rank:(rank + 1) * per_rank]
    return [collate([dataset[i] for i in mine[j:j + micro_batch_size]])
            for j in range(0, len(mine), micro_batch_size)]
