"""One training step on megatron-core: its DDP wrapper, its pipeline schedules and its grad
finalisation. Micro-batches are dicts of `tokens`, `labels`, `loss_mask` ([b, s] tensors), and
for packed sequences `cu_seqlens` and `max_seqlen` (data.collate): those run as one THD row of
b * s positions whose samples attend only to themselves (megatron-core's PackedSeqParams)."""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from pesc_megatron.model.attention import block_causal_mask, uses_thd
from pesc_megatron.parallel.distributed import device, max_over_ranks


def wrap_ddp(model: torch.nn.Module,
             use_distributed_optimizer: bool = False) -> DistributedDataParallel:
    """megatron-core DDP: contiguous fp32 grad buffers for the trainable parameters only
    (sharded for megatron-core's distributed optimizer if `use_distributed_optimizer`)."""
    config = get_model_config(model)
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                      use_distributed_optimizer=use_distributed_optimizer),
        module=model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    return ddp


def model_inputs(batch: dict, thd: bool = True) -> dict:
    """A collated micro-batch on this rank's device, with the model's `attention_mask` and
    `packed_seq_params`. Packed sequences (`cu_seqlens`) become, with `thd`, one row of b * s
    positions with megatron-core's THD PackedSeqParams, else (the local attention) keep their
    [b, s] layout with the block-diagonal mask built here from the same boundaries. Unpacked
    ones are causal (both None)."""
    batch = {k: v.to(device()) if torch.is_tensor(v) else v for k, v in batch.items()}
    batch.update(attention_mask=None, packed_seq_params=None)
    if "cu_seqlens" not in batch:
        return batch
    cu = batch["cu_seqlens"]
    if not thd:
        b, s = batch["tokens"].shape
        return dict(batch, attention_mask=block_causal_mask(cu, b, s))
    batch = {k: v.reshape(1, -1) if torch.is_tensor(v) and v.dim() == 2 else v
             for k, v in batch.items()}
    return dict(batch, packed_seq_params=PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=batch["max_seqlen"],
        max_seqlen_kv=batch["max_seqlen"]))


def _forward_step(data_iterator, model, loss_scale: float | None = None):
    config = get_model_config(model)
    batch = model_inputs(next(data_iterator), uses_thd(config))
    tokens = batch["tokens"]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    # padding_mask (True = padding) keeps pad positions out of the router's balancing loss and
    # load counts. megatron-core scatters it for sequence parallelism on the first pipeline
    # stage only, so with PP and SP together it is left out (pads are then counted).
    padding_mask = batch.get("padding_mask")
    if config.pipeline_model_parallel_size > 1 and config.sequence_parallel:
        padding_mask = None
    # loss_mask: the output layer computes logits at the loss positions only (PESCGPTModel)
    output = model(tokens, position_ids, batch["attention_mask"], labels=batch["labels"],
                   loss_mask=batch["loss_mask"], padding_mask=padding_mask,
                   packed_seq_params=batch["packed_seq_params"])
    loss_mask = batch["loss_mask"].float()

    def loss_func(per_token_loss):
        loss_sum = (per_token_loss.float() * loss_mask).sum()
        tokens = loss_mask.sum()
        mean = loss_sum / tokens.clamp(min=1)
        # The schedule divides by the number of micro-batches and DDP averages over DP. Without
        # `loss_scale` the objective is thus the mean of the micro-batches' means; with it
        # (micro-batches x DP / the global batch's loss tokens) the sum of every token loss
        # over the global number of loss tokens, whatever the layout.
        loss = mean if loss_scale is None else loss_sum * loss_scale
        # Copies: the schedule divides `loss` in place.
        return loss, {"lm_loss": mean.detach().clone(), "loss_sum": loss_sum.detach().clone(),
                      "tokens": tokens.detach()}

    return output, loss_func


def forward_backward(model, micro_batches: list[dict], num_microbatches: int,
                     seq_length: int, micro_batch_size: int, forward_only: bool = False):
    """Runs megatron-core's schedule for this rank's micro-batches. On the last pipeline stage
    returns the mean lm loss over them (the training objective: each micro-batch's mean over
    its loss tokens, averaged), and None elsewhere. Gradients are finalised (DP/SP all-reduces)
    unless `forward_only`."""
    stats = run_schedule(model, micro_batches, num_microbatches, seq_length, micro_batch_size,
                         forward_only)
    return None if stats is None else stats["lm_loss"]


def run_schedule(model, micro_batches: list[dict], num_microbatches: int, seq_length: int,
                 micro_batch_size: int, forward_only: bool = False,
                 global_loss_tokens: float | None = None):
    """Like `forward_backward`, returning on the last stage {"lm_loss": mean of micro-batch
    means, "loss_sum": summed token losses, "tokens": loss tokens} for this rank. With
    `global_loss_tokens` (the loss tokens of the whole global batch, every rank the same) the
    gradient is that of the per-token objective: every token loss summed, over that count."""
    loss_scale = None
    if global_loss_tokens is not None:
        loss_scale = (num_microbatches * parallel_state.get_data_parallel_world_size()
                      / max(global_loss_tokens, 1.0))
    if micro_batches and "cu_seqlens" in micro_batches[0] and uses_thd(get_model_config(model)):
        # THD: one row of b * s positions
        seq_length, micro_batch_size = seq_length * micro_batch_size, 1
    losses = get_forward_backward_func()(
        forward_step_func=functools.partial(_forward_step, loss_scale=loss_scale),
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return {"lm_loss": torch.stack([d["lm_loss"] for d in losses]).mean(),
            "loss_sum": torch.stack([d["loss_sum"] for d in losses]).sum(),
            "tokens": torch.stack([d["tokens"] for d in losses]).sum()}


@torch.no_grad()
def forward_only(model, micro_batches: list[dict], seq_length: int, micro_batch_size: int):
    """`run_schedule` without gradients, in eval mode (no dropout), leaving the routers' load
    counters as they were: evaluation and calibration passes are not routing load."""
    was_training = model.training
    saved_load = [(m, m.expert_load.clone()) for m in model.modules() if hasattr(m, "expert_load")]
    model.eval()
    stats = run_schedule(model, micro_batches, len(micro_batches), seq_length, micro_batch_size,
                         forward_only=True)
    model.train(was_training)
    for m, load in saved_load:
        m.expert_load.copy_(load)
    return stats


def last_stage_sum(value: torch.Tensor | float | None) -> torch.Tensor:
    """Sum over data-parallel ranks of a value held identically by every tensor-parallel rank
    of the last pipeline stage: an all-reduce over the world, where the other stages give 0
    (pass None there), divided by the tensor-parallel size."""
    t = torch.zeros(1, dtype=torch.float64, device=device())
    if value is not None:
        t += torch.as_tensor(value, dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t / parallel_state.get_tensor_model_parallel_world_size()


def global_loss_tokens(micro_batches: list[dict]) -> float:
    """The loss tokens of the global batch: this rank's micro-batches summed over DP (every
    rank of a data-parallel replica holds the same micro-batches)."""
    local = sum(mb["loss_mask"].sum() for mb in micro_batches) if micro_batches else 0.0
    tokens = torch.as_tensor(local, dtype=torch.float64, device=device()).reshape(1)
    dist.all_reduce(tokens, group=parallel_state.get_data_parallel_group())
    return tokens.item()


def all_finite(ddp, stats: dict | None) -> bool:
    """Whether the loss and every gradient of this step are finite on every rank (all agree).
    The local gradient buffers are checked before any sharding, so a non-finite value anywhere
    is seen by all."""
    # Every main_grad is a view into one of DDP's contiguous buffers (the rest of them is zero
    # padding), so the buffers' minima and maxima hold any NaN or inf: one read-only pass
    # (isfinite per parameter: 510 tensors x 5 ops, 26 ms on SmolLM2's 17.8M; this: 2 ms). One
    # flag tensor, read once (a read per tensor would sync the GPU each time).
    checks = [torch.isfinite(torch.stack(torch.aminmax(buffer.grad_data))).all()
              for buffer in ddp.buffers + ddp.expert_parallel_buffers
              if buffer.grad_data.numel()]
    if stats is not None:
        checks.append(torch.isfinite(stats["loss_sum"]).all())
    return max_over_ranks(not torch.stack(checks).all().item() if checks else False) == 0


def state_is_finite(model, optimizer) -> bool:
    """Whether every trainable weight and every optimizer tensor (master weights, Adam's
    moments) is finite on every rank (all agree): checked before each checkpoint."""
    tensors = [p for p in model.parameters() if p.requires_grad]
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        tensors += [p for group in inner.param_groups for p in group["params"]]
        tensors += [v for state in inner.state.values() for v in state.values()
                    if torch.is_tensor(v)]
    bad = any(not torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    return max_over_ranks(bad) == 0


def train_step(ddp, optimizer, micro_batches: list[dict], num_microbatches: int,
               seq_length: int, micro_batch_size: int, per_token: bool = True,
               poison: bool = False) -> tuple[float, float, bool]:
    """One optimizer step over this rank's micro-batches. Returns, on every rank, the LM loss
    (the objective without the router losses: the mean over the global batch's loss tokens,
    or with `per_token=False` the mean of the micro-batches' means), the gradient norm before
    clipping, and whether the step was skipped: a non-finite loss or gradient on any rank
    leaves the weights and the optimizer state as they were. `poison` (a fault-injection
    hook for tests) makes this rank's gradients NaN."""
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    tokens = global_loss_tokens(micro_batches) if per_token else None
    stats = run_schedule(ddp, micro_batches, num_microbatches, seq_length, micro_batch_size,
                         global_loss_tokens=tokens)
    if poison:
        next(p for p in ddp.parameters() if p.requires_grad).main_grad.fill_(float("nan"))
    if per_token:
        lm = last_stage_sum(None if stats is None else stats["loss_sum"]).item() / max(tokens, 1)
    else:
        lm = last_stage_sum(None if stats is None else stats["lm_loss"]).item()
        lm /= parallel_state.get_data_parallel_world_size()
    if not all_finite(ddp, stats):
        return lm, float("nan"), True
    _, grad_norm, _ = optimizer.step()
    return lm, float(grad_norm or 0.0), False
