"""megatron-core `dist_checkpointing` I/O shared by base and training checkpoints: every rank
writes its shards into a hidden folder that becomes the checkpoint only when complete."""
from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

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
