"""megatron-core `dist_checkpointing` I/O shared by base and training checkpoints: every rank
writes its shards into a hidden folder that becomes the checkpoint only when complete."""
from __future__ import annotations

import dataclasses
import functools
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from pesc_megatron.checkpoint.atomic import new_partial, publish
from pesc_megatron.checkpoint.format import WEIGHTS
from pesc_megatron.model.roles import role_of, roles_by_storage
from pesc_megatron.parallel.lifetime import die_with_parent
from pesc_megatron.parallel.distributed import is_rank0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_sharded(out: Path, sharded_state: dict, write_files: Callable[[Path], None],
                 then: Callable[[], None] = lambda: None, async_queue=None) -> None:
    """Called on every rank: `sharded_state` through dist_checkpointing into `WEIGHTS`, then rank
    0's `write_files(folder)`, all in a fresh hidden folder beside `out` that becomes `out` only
    when complete (an old `out` is replaced at that moment); removed if anything fails. Rank
    0 then calls `then()`, and every rank waits for it. With `async_queue` (megatron-core's
    AsyncCallsQueue) the weights are written by a background process and all that follows
    their writing runs when the queue finalizes the save (every rank, a later step)."""
    name = [str(new_partial(out)) if is_rank0() else None]
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    partial = Path(name[0])

    def finish() -> None:
        if is_rank0():
            write_files(partial)
            publish(partial, out)
            then()
        barrier()

    try:
        if is_rank0():
            (partial / WEIGHTS).mkdir()
        barrier()
        request = dist_checkpointing.save(sharded_state, str(partial / WEIGHTS),
                                          async_sharded_save=async_queue is not None)
        if request is None:
            finish()
            return
        request.add_finalize_fn(finish)
        if request.async_fn is not None:  # the writer process is useless once its rank died
            request = request._replace(async_fn=functools.partial(_dying_with_parent,
                                                                  request.async_fn))
        async_queue.schedule_async_request(request)
    except BaseException:
        if is_rank0():
            shutil.rmtree(partial, ignore_errors=True)
        raise


def _dying_with_parent(fn, *args, **kwargs):
    die_with_parent()
    return fn(*args, **kwargs)


def sharded_roles(model, entries: dict | None = None) -> dict[str, str | None]:
    """{key of `model.sharded_state_dict()`: the role of its parameter (router, adapter, lora;
    None: the frozen base)}, from the marks the builder set. An entry without a tensor (a
    module's extra state) takes the role of its module's weights."""
    roles = roles_by_storage(model)
    entries = model.sharded_state_dict() if entries is None else entries
    of_tensor = {k: role_of(v.data, roles) for k, v in entries.items()
                 if torch.is_tensor(getattr(v, "data", None))}
    of_module = {k.rsplit(".", 1)[0]: r for k, r in of_tensor.items() if r is not None}
    return {k: of_tensor[k] if k in of_tensor else of_module.get(k.rsplit(".", 1)[0])
            for k in entries}


def trainable_sharded_state_dict(model, with_lora: bool = True,
                                 entries: dict | None = None) -> dict:
    """The router, adapter and (`with_lora`) LoRA weights of `model.sharded_state_dict()`
    (what training changes; not their modules' extra state), or of `entries`, built by it."""
    entries = model.sharded_state_dict() if entries is None else entries
    roles = sharded_roles(model, entries)
    return {k: v for k, v in entries.items()
            if roles[k] is not None and torch.is_tensor(getattr(v, "data", None))
            and (with_lora or roles[k] != "lora")}


class _RegionPlanner(DefaultLoadPlanner):
    """torch.distributed.checkpoint's planner, reading only the given regions of the saved
    tensors: `regions` = [(key, offsets in the saved tensor, destination tensor)]."""

    def __init__(self, regions: list):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        items = []
        for i, (key, offsets, dest) in enumerate(self.regions):
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.size())
            for item in create_read_items_for_chunk_list(
                    key, self.metadata.state_dict_metadata[key], [chunk]):
                # Two regions may read one key (SwiGLU's halves): destinations by position
                # (plain tensors; the read item's offsets narrow them).
                items.append(dataclasses.replace(item, dest_index=MetadataIndex(str(i))))
        return LoadPlan(items)


def read_shard(entry, folder: Path) -> torch.Tensor:
    """This rank's part of one entry of a sharded state dict (a ShardedTensor, or a factory
    such as megatron-core's SwiGLU one), read from the torch_dist checkpoint `folder` into a
    fresh tensor, and nothing else: no collective, and of a tensor that stacks all layers
    only this layer's region (dist_checkpointing.load reads whole stacked tensors in a
    one-rank world and merges factories through a copy)."""
    data = torch.empty(entry.data.shape, dtype=entry.data.dtype, device=entry.data.device)
    entry = dataclasses.replace(entry, data=data)
    parts = entry.build() if isinstance(entry, ShardedTensorFactory) else [entry]
    regions = []
    for sh in nested_values(parts):
        assert sh.flattened_range is None, sh.key
        sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        regions.append((sh.key, sh.global_offset, sh.data.view(sizes)))
    state = {str(i): dest for i, (_, _, dest) in enumerate(regions)}
    with warnings.catch_warnings():  # "... assuming ... a single process": this rank's read
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)),
                 planner=_RegionPlanner(regions), no_dist=True)
    return data
