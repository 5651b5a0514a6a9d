"""Code that runs inside spawned gloo ranks (importable by torch.multiprocessing's children)."""
from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pesc_megatron.parallel.distributed import free_port

TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                  max_position_embeddings=64)
TINY_PESC = dict(num_experts=4, topk=2, adapter_dim=16, adapter_scaling=0.5,
                 adapter_dropout=0.0, aux_loss_coeff=0.01, z_loss_coeff=0.001)
TINY_LORA = dict(targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"], rank=4, alpha=8.0, dropout=0.0)
SEQ, GLOBAL_BATCH = 8, 4


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        fn(*args)
    except Exception:
        traceback.print_exc()
        raise


def spawn(fn, world: int, *args) -> None:
    """Runs fn(*args) on `world` local gloo ranks (env as torchrun sets it)."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def spawn_per_rank(fn, world: int, runs, root) -> list:
    """Runs fn(runs, root) on `world` ranks, each saving root/rank<r>.pt; returns them by rank."""
    spawn(fn, world, runs, str(root))
    return [torch.load(root / f"rank{r}.pt") for r in range(world)]


def global_batch():
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, TINY_MODEL["vocab_size"], (GLOBAL_BATCH, SEQ + 1), generator=g)
    mask = torch.ones(GLOBAL_BATCH, SEQ)
    mask[0, :3] = 0  # a prompt that carries no loss
    return [dict(tokens=tokens[i:i + 1, :-1], labels=tokens[i:i + 1, 1:],
                 loss_mask=mask[i:i + 1]) for i in range(GLOBAL_BATCH)]


# Packed sequences of PACKED_SEQ positions: samples of different lengths, padding tails.
PACKED_SEQ, PACKED_MICRO_BATCH = 16, 2
PACKED_SAMPLES = ([5, 7, 4], [16], [3, 3, 6], [9])


def packed_global_batch() -> list[dict]:
    """The global batch as packed micro-batches of PACKED_MICRO_BATCH sequences (collated as
    the data pipeline collates them: sample boundaries, no mask)."""
    from pesc_megatron.data import collate

    g = torch.Generator().manual_seed(4321)
    s, items = PACKED_SEQ, []
    for lengths in PACKED_SAMPLES:
        tokens = torch.randint(0, TINY_MODEL["vocab_size"], (s + 1,), generator=g)
        bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
        pad = torch.arange(s) >= bounds[-1]
        loss_mask = (~pad).float()
        loss_mask[bounds[0]:bounds[0] + 2] = 0  # a prompt that carries no loss
        items.append(dict(tokens=tokens[:-1], labels=tokens[1:], loss_mask=loss_mask,
                          padding_mask=pad, cu_seqlens=torch.tensor(
                              bounds + ([s] if bounds[-1] < s else []), dtype=torch.int32)))
    return [collate(items[i:i + PACKED_MICRO_BATCH])
            for i in range(0, len(items), PACKED_MICRO_BATCH)]


def parity_worker(layout: dict, ckpt_dir: str, out_path: str) -> None:
    """Builds the tiny PESC model at `layout`, loads (or, at the reference layout, creates and
    saves) its weights, runs one forward/backward over the global batch and has rank 0 save
    the loss and every trainable gradient keyed by its single-rank name. Besides the parallel
    sizes, `layout` may set dispatcher, capacity_factor, lora, attention, recompute, experts and
    packed (the packed
    global batch instead of the unpacked one)."""
    from megatron.core import dist_checkpointing, parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from pesc_megatron.model.builder import build_model
    from pesc_megatron.model.config import LoRAConfig, ModelConfig, PESCConfig
    from pesc_megatron.parallel.config import ParallelConfig
    from pesc_megatron.parallel.distributed import destroy, initialize
    from pesc_megatron.train.step import forward_backward, wrap_ddp

    layout = dict(layout)
    dispatcher = layout.pop("dispatcher", "alltoall")
    capacity_factor = layout.pop("capacity_factor", None)
    lora = LoRAConfig(**TINY_LORA) if layout.pop("lora", False) else None
    options = dict(attention=layout.pop("attention", "sdpa"),
                   recompute=layout.pop("recompute", "none"),
                   experts=layout.pop("experts", "grouped"))
    packed = layout.pop("packed", False)
    par = ParallelConfig(**layout)
    initialize(par, seed=7)
    pesc = PESCConfig(**{**TINY_PESC, "dispatcher": dispatcher,
                         "capacity_factor": capacity_factor})
    model = build_model(ModelConfig(**TINY_MODEL), pesc, par, lora=lora, **options)
    reference = not os.path.exists(ckpt_dir)
    if reference:  # non-zero adapters so that every trainable tensor has a gradient
        assert dist.get_world_size() == 1
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_(0, 0.2)
        os.makedirs(ckpt_dir)
        dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
    ddp = wrap_ddp(model)

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batches, seq, mbs = (packed_global_batch(), PACKED_SEQ, PACKED_MICRO_BATCH) if packed \
        else (global_batch(), SEQ, 1)
    mine = batches[dp_rank * len(batches) // dp:(dp_rank + 1) * len(batches) // dp]
    loss = forward_backward(ddp, mine, len(mine), seq, mbs)
    if loss is not None:
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        loss = (loss / dp).item()

    offset = get_transformer_layer_offset(model.config)
    n_local = pesc.num_experts // par.ep
    grads = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        parts[2] = str(int(parts[2]) + offset)  # decoder.layers.<L>
        if "local_experts" in parts:
            i = parts.index("local_experts") + 1
            parts[i] = str(int(parts[i]) + ps.get_expert_model_parallel_rank() * n_local)
        grad = p.main_grad.detach().clone()
        split = getattr(p, "tensor_model_parallel", False)
        if ".lora." in name and split and par.tp > 1:  # LoRA's A or B split over TP
            shards = [torch.empty_like(grad) for _ in range(par.tp)]
            dist.all_gather(shards, grad, group=ps.get_tensor_model_parallel_group())
            grad = torch.cat(shards, dim=p.partition_dim)
        grads[".".join(parts)] = grad
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (loss, grads))
    if dist.get_rank() == 0:
        losses = [l for l, _ in gathered if l is not None]
        merged = {}
        for _, g in gathered:
            for k, v in g.items():
                merged.setdefault(k, v)
        torch.save({"loss": losses[0], "grads": merged}, out_path)
    destroy()


def check_layout(reference, world, layout, name, rtol=1e-5):
    """parity_worker at `layout` on `world` ranks gives the reference's loss and every
    trainable gradient within `rtol` (`reference`: (root, results) of the single-rank run)."""
    root, ref = reference
    spawn(parity_worker, world, layout, str(root / "ckpt"), str(root / f"{name}.pt"))
    got = torch.load(root / f"{name}.pt")
    assert abs(got["loss"] - ref["loss"]) <= rtol * abs(ref["loss"])
    assert got["grads"].keys() == ref["grads"].keys()
    for key, want in ref["grads"].items():
        assert want.abs().max() > 0, key  # every trainable tensor is exercised
        torch.testing.assert_close(got["grads"][key], want, rtol=rtol,
                                   atol=rtol * want.abs().max().item(), msg=key)


def objective_worker(layout: dict, ckpt: str, items_path: str, weights_dir: str,
                     out_path: str) -> None:
    """One `train_step` (Adam, no clipping) of the tiny real checkpoint at `layout` on the
    sequences in `items_path`, split over DP and grouped into micro-batches of
    `layout["micro_batch_size"]`; `layout["per_token"]` picks the objective. Dropout and the
    router losses are off. The first run (one rank) draws non-zero routers and adapters and
    saves them to `weights_dir`; the others load them. Rank 0 saves the LM loss, the grad
    norm and every updated trainable weight, keyed by its single-rank name."""
    from megatron.core import dist_checkpointing, parallel_state as ps

    from pesc_megatron.checkpoint import base as checkpoint
    from pesc_megatron.checkpoint.sharded import trainable_sharded_state_dict
    from pesc_megatron.data import collate
    from pesc_megatron.parallel.config import ParallelConfig
    from pesc_megatron.parallel.distributed import destroy, initialize
    from pesc_megatron.train.config import OptimConfig
    from pesc_megatron.train.optim import build_optimizer
    from pesc_megatron.train.step import train_step, wrap_ddp

    layout = dict(layout)
    mbs, per_token = layout.pop("micro_batch_size"), layout.pop("per_token")
    par = ParallelConfig(**layout)
    initialize(par, seed=7)
    model, info = checkpoint.load(ckpt, par, pesc_overrides=dict(
        adapter_dropout=0.0, aux_loss_coeff=0.0, z_loss_coeff=0.0))
    if not os.path.exists(weights_dir):
        assert dist.get_world_size() == 1
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        os.makedirs(weights_dir)
        dist_checkpointing.save({"model": trainable_sharded_state_dict(model)}, weights_dir)
    else:
        state = dist_checkpointing.load({"model": trainable_sharded_state_dict(model)},
                                        weights_dir)
        model.load_state_dict(state["model"], strict=False)
    ddp = wrap_ddp(model)
    optimizer = build_optimizer(ddp, OptimConfig(lr=1e-3, clip_grad=0.0), "fp32")
    items = torch.load(items_path)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = items[dp_rank * len(items) // dp:(dp_rank + 1) * len(items) // dp]
    batches = [collate(mine[j:j + mbs]) for j in range(0, len(mine), mbs)]
    seq = batches[0]["tokens"].shape[1]
    lm, grad_norm, _ = train_step(ddp, optimizer, batches, len(batches), seq, mbs,
                               per_token=per_token)
    n_local = info.pesc.num_experts // par.ep
    weights = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts = name.split(".")
            if "local_experts" in parts:
                i = parts.index("local_experts") + 1
                parts[i] = str(int(parts[i]) + ps.get_expert_model_parallel_rank() * n_local)
            weights[".".join(parts)] = p.detach().clone()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, weights)
    if dist.get_rank() == 0:
        merged = {k: v for w in gathered for k, v in w.items()}
        torch.save({"lm": lm, "grad_norm": grad_norm, "weights": merged}, out_path)
    destroy()
