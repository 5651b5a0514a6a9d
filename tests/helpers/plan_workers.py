"""Spawned-rank code for test_plan.py: the bytes each rank really allocates for parameters,
gradient buffers and optimizer state, and its frozen weights once in FP8 and in NF4, next to
`pesc plan`'s formulas for that rank."""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

# Every trainable tensor is a multiple of 64 elements and every buffer a multiple of 128 per
# data-parallel rank, so megatron-core's distributed-optimizer buffers carry no padding (which
# the planner leaves out) and the comparison can be exact.
MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
PESC = dict(num_experts=4, topk=2, adapter_dim=16, adapter_dropout=0.0)
LORA = dict(targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj"], rank=4, dropout=0.0)
SEQ = 16


def _optimizers(opt):
    """The torch optimizers inside megatron-core's (possibly chained) optimizer."""
    return [o.optimizer for o in getattr(opt, "chained_optimizers", [opt])]


def _measure(layout: dict, lora: bool, tied: bool, distributed: bool) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from pesc_megatron.analysis.plan import (
        Job,
        Layout,
        frozen_bytes,
        gradient_bytes,
        optimizer_bytes,
        trainable_bytes,
        trainable_counts,
    )
    from pesc_megatron.model.builder import build_model
    from pesc_megatron.model.config import LoRAConfig, ModelConfig, PESCConfig
    from pesc_megatron.model.precision import PrecisionConfig
    from pesc_megatron.model.quantized import (
        QUANTIZED_MODULES,
        convert_frozen_weights,
        frozen_weight_bytes,
        pick_exact_columns,
    )
    from pesc_megatron.parallel.config import ParallelConfig
    from pesc_megatron.parallel.distributed import initialize
    from pesc_megatron.train.step import forward_backward, forward_only, wrap_ddp

    par = ParallelConfig(**layout)
    initialize(par, seed=7)
    model_cfg = ModelConfig(**MODEL, tie_word_embeddings=tied)
    lora_cfg = LoRAConfig(**LORA) if lora else LoRAConfig()
    model = build_model(model_cfg, PESCConfig(**PESC), par, lora=lora_cfg)
    ddp = wrap_ddp(model, use_distributed_optimizer=distributed)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3,
                                                 use_distributed_optimizer=distributed), [ddp])
    tokens = torch.randint(0, MODEL["vocab_size"], (1, SEQ + 1),
                           generator=torch.Generator().manual_seed(0))
    batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(1, SEQ))
    forward_backward(ddp, [batch], 1, SEQ, 1)
    assert opt.step()[0]  # Adam's state exists from the first step on

    buffers = ddp.buffers + ddp.expert_parallel_buffers
    assert all(b.numel == b.numel_unpadded for b in buffers), "padded buffer: resize MODEL"
    params = list(model.parameters())
    state = [t for o in _optimizers(opt) for s in o.state.values()
             for key, t in s.items() if key != "step"]  # Adam's m and v
    measured = dict(
        frozen=sum(p.nbytes for p in params if not p.requires_grad),
        trainable=sum(p.nbytes for p in params if p.requires_grad),
        gradients=sum(b.grad_data.nbytes for b in buffers),
        optimizer=sum(t.nbytes for t in state))

    # The default FP8 and NF4 frozen bases (output layer with 32 columns kept).
    convert_frozen_weights(model, "fp8", "dequantize", output_layer=True, outliers=32,
                           calibrate=lambda: forward_only(ddp, [batch], SEQ, 1))
    measured["frozen_fp8"] = frozen_weight_bytes(model)["bytes"]
    model = build_model(model_cfg, PESCConfig(**PESC), par, lora=lora_cfg)
    layers = {n: m for n, m in model.named_modules()
              if n.startswith("decoder.layers.") and isinstance(m, QUANTIZED_MODULES)
              and not m.weight.requires_grad}
    exact = {n: m.weight.detach().clone() for n, m in layers.items()}
    convert_frozen_weights(model, "nf4", output_layer=True, outliers=32,
                           calibrate=lambda: forward_only(model, [batch], SEQ, 1))
    for name, linear in layers.items():  # as the loader does, with the default count
        pick_exact_columns(linear, exact[name], torch.ones(exact[name].shape[1]),
                            PrecisionConfig().linear_outliers)
    measured["frozen_nf4"] = frozen_weight_bytes(model)["bytes"]

    job = Job(model_cfg, PESCConfig(**PESC), lora_cfg, dtype="fp32",
              distributed_optimizer=distributed)
    lay = Layout(par.tp, par.pp, par.ep, par.etp, dist.get_world_size())
    counts = trainable_counts(job, lay)
    stage = ps.get_pipeline_model_parallel_rank()
    predicted = dict(frozen=frozen_bytes(job, lay, stage),
                     trainable=trainable_bytes(job, counts), gradients=gradient_bytes(counts),
                     optimizer=optimizer_bytes(job, lay, counts),
                     **{f"frozen_{kind}": frozen_bytes(
                         dataclasses.replace(job, frozen_weights=kind), lay, stage)
                        for kind in ("fp8", "nf4")})
    return dict(measured=measured, predicted=predicted)


def plan_worker(runs: dict, root: str) -> None:
    """`_measure` for each of `runs` ({name: kwargs}) in one set of processes; rank r saves
    {name: result} to root/rank<r>.pt."""
    from pesc_megatron.parallel.distributed import destroy

    results = {name: _measure(**kwargs) for name, kwargs in runs.items()}
    torch.save(results, os.path.join(root, f"rank{dist.get_rank()}.pt"))
    destroy()
