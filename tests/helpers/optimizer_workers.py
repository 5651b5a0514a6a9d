"""Spawned-rank code for test_optimizer.py (importable by torch.multiprocessing's children)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from tests.helpers.workers import SEQ, TINY_MODEL, global_batch

STEPS, SAVE_AFTER, LR, CLIP = 3, 2, 1e-2, 1e-4


def _trainer(par, distributed: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from pesc_megatron.model.builder import build_model
    from pesc_megatron.model.config import ModelConfig, PESCConfig
    from pesc_megatron.parallel.distributed import set_seed
    from pesc_megatron.train.step import wrap_ddp

    set_seed(7)  # the same frozen weights for every trainer of this run
    model = build_model(ModelConfig(**TINY_MODEL),
                        PESCConfig(num_experts=4, topk=2, adapter_dim=8, adapter_dropout=0.0), par)
    g = torch.Generator().manual_seed(0)  # non-zero adapters, the same on every rank
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ddp = wrap_ddp(model, use_distributed_optimizer=distributed)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, clip_grad=CLIP,
                        use_distributed_optimizer=distributed), [ddp])
    return model, ddp, opt


def _expected_norm(model) -> float:
    """L2 norm of the trainable gradients after DDP's reduction, computed here: dense grads
    are replicated over the ranks, expert grads are per expert-parallel rank."""
    from megatron.core import parallel_state as ps

    dense, expert = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.requires_grad:
            sq = p.main_grad.double().square().sum()
            if getattr(p, "allreduce", True):
                dense += sq
            else:
                expert += sq
    dist.all_reduce(expert, group=ps.get_expert_model_parallel_group())
    return math.sqrt(dense.item() + expert.item())


def _step(ddp, opt, batch):
    from pesc_megatron.train.step import forward_backward

    ddp.zero_grad_buffer()
    opt.zero_grad()
    forward_backward(ddp, batch, len(batch), SEQ, 1)


def _run(layout: dict, sharding: str, ckpt_dir: str) -> dict:
    """Trains the tiny model for STEPS steps with the plain and with the distributed optimizer
    (clipping active), the latter also resumed from a dist checkpoint taken after SAVE_AFTER
    steps; returns this rank's grad norms (with an independently computed expectation for the
    plain run) and the trainable parameters of each run."""
    from megatron.core import dist_checkpointing, parallel_state as ps

    from pesc_megatron.parallel.config import ParallelConfig
    from pesc_megatron.parallel.distributed import initialize

    par = ParallelConfig(**layout)
    initialize(par, seed=7)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batch = global_batch()
    mine = batch[dp_rank * len(batch) // dp:(dp_rank + 1) * len(batch) // dp]
    meta = {"distrib_optim_sharding_type": sharding, "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}
    out = {"dp": dp}

    def trainable(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    for distributed in (False, True):
        model, ddp, opt = _trainer(par, distributed)
        norms, expected = [], []
        for i in range(STEPS):
            if distributed and i == SAVE_AFTER:
                sd = model.sharded_state_dict()
                dist_checkpointing.save(
                    {"model": sd, "optimizer": opt.sharded_state_dict(sd, metadata=meta)},
                    ckpt_dir)
            _step(ddp, opt, mine)
            if not distributed:  # the distributed optimizer's grads are only valid per shard
                expected.append(_expected_norm(model))
            ok, norm, _ = opt.step()
            assert ok
            norms.append(norm)
        out["distributed" if distributed else "plain"] = dict(
            norms=norms, expected=expected, params=trainable(model))

    model, ddp, opt = _trainer(par, True)
    sd = model.sharded_state_dict()
    loaded = dist_checkpointing.load(
        {"model": sd, "optimizer": opt.sharded_state_dict(sd, is_loading=True, metadata=meta)},
        ckpt_dir)
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    for _ in range(SAVE_AFTER, STEPS):
        _step(ddp, opt, mine)
        assert opt.step()[0]
    out["resumed"] = dict(params=trainable(model))
    return out


def optimizer_worker(runs: dict, root: str) -> None:
    """`_run` for each of `runs` ({name: (layout, checkpoint format)}) in one set of processes
    (start-up dominates); rank r saves {name: results} to root/rank<r>.pt."""
    import os

    from pesc_megatron.parallel.distributed import destroy

    results = {}
    for name, (layout, sharding) in runs.items():
        ckpt_dir = os.path.join(root, f"ckpt_{name}")
        os.makedirs(ckpt_dir, exist_ok=True)
        results[name] = _run(layout, sharding, ckpt_dir)
    torch.save(results, os.path.join(root, f"rank{dist.get_rank()}.pt"))
    destroy()
