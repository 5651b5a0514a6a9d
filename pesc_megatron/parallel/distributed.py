"""Distributed start-up: torch.distributed from torchrun's environment, then megatron-core's
parallel_state and seeds. NCCL when CUDA is present, gloo (with the CPU backend) otherwise."""
from __future__ import annotations

import datetime
import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from pesc_megatron.parallel import mcore_patches
from pesc_megatron.parallel.config import ParallelConfig


def initialize(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30) -> None:
    """Initialises torch.distributed (env:// as torchrun sets it, or a single process when
    RANK is unset), megatron-core's process groups for `parallel`, and the RNG seeds."""
    mcore_patches.apply()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "RANK" in os.environ:  # torchrun (or any env:// launcher)
            dist.init_process_group(backend, timeout=timeout)
        else:  # plain `python ...`: a world of one, no TCP port needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    # A second tool in one process keeps the groups of the same layout: making them again
    # would leak the old ones (`_layout`).
    if (parallel_state.model_parallel_is_initialized()
            and _layout() != (parallel.tp, parallel.pp, parallel.ep, parallel.etp)):
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            expert_model_parallel_size=parallel.ep,
            expert_tensor_parallel_size=parallel.etp,
        )
    set_seed(seed)


def _layout() -> tuple[int, int, int, int]:
    """The current groups' TP, PP, EP and expert-TP sizes. megatron-core's
    `destroy_model_parallel` only forgets its groups; torch keeps each one (gloo: three threads,
    polling), so a process that re-made them for every tool slowed down as it went (700 idle
    gloo groups took 0.6 of a core and doubled a matmul's time)."""
    ps = parallel_state
    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size())


def device() -> torch.device:
    """Where this rank's model and batches live: its GPU under NCCL, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def set_seed(seed: int) -> None:
    """Seeds as Megatron-LM does: pipeline stages differ, the model-parallel RNG tracker forks
    per tensor/expert rank."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    """Global rank 0 (or no process group: a single process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def say(*args, file=None) -> None:
    """print() on global rank 0 only, flushed (every rank runs the same code)."""
    if is_rank0():
        print(*args, file=file, flush=True)


def max_over_ranks(value: float) -> float:
    """The largest `value` of all ranks, on every rank (one all-reduce): to agree on a flag."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def free_port() -> int:
    """A TCP port free on this host now, for a local rendezvous (MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
