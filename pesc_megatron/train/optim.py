"""The optimizer and LR schedule: megatron-core's Adam (`get_megatron_optimizer`, optionally
its distributed optimizer) and `OptimizerParamScheduler`, built from `optim.*` (OptimConfig)
for `pesc train`, `pesc demo` and the benchmarks alike."""
from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from pesc_megatron.train.config import OptimConfig

# megatron-core's names for our schedules (warmup is linear from 0 in all of them).
DECAY_STYLE = {"constant_with_warmup": "constant", "cosine": "cosine", "linear": "linear"}


def build_optimizer(ddp, o: OptimConfig, dtype: str = "fp32"):
    """megatron-core's Adam over `ddp`'s trainable parameters (bf16: with fp32 main weights)."""
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=dtype == "bf16",
        params_dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
        use_distributed_optimizer=o.distributed), [ddp])
    fuse_torch_adam(optimizer)
    return optimizer


def fuse_torch_adam(optimizer) -> None:
    """Without Transformer Engine or apex, megatron-core falls back to torch's AdamW, which
    then loops over the parameters in Python (foreach is CUDA's default only): four to six
    small ops per tensor, 510 tensors for SmolLM2 with 8 experts. torch's fused AdamW (one
    kernel per tensor, the same update) runs on CPU and CUDA."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            for group in inner.param_groups:
                group.update(fused=True, foreach=False)


def build_scheduler(optimizer, o: OptimConfig, iters: int) -> OptimizerParamScheduler:
    """megatron-core's scheduler, stepped once per optimizer step: linear warmup from 0 over
    optim.warmup_steps, then constant, cosine or linear decay to optim.min_lr at `iters`."""
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(iters, o.warmup_steps + 1), lr_decay_style=DECAY_STYLE[o.schedule],
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(iters, 1),
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True)
