"""One training step on megatron-core: its DDP wrapper, its pipeline schedules and its grad
finalisation. Micro-batches are dicts of `tokens`, `labels`, `loss_mask` ([b, s] tensors), and
for packed sequences `cu_seqlens` and `max_seqlen` (data.collate): those run as one THD row of
b * s positions whose samples attend only to themselves (megatron-core's PackedSeqParams)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from pesc_megatron.model.attention import block_causal_mask, uses_thd
from pesc_megatron.parallel.distributed import device


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


def _forward_step(data_iterator, model):
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
        # Mean over this micro-batch's loss tokens; the schedule averages micro-batches.
        loss_sum = (per_token_loss.float() * loss_mask).sum()
        tokens = loss_mask.sum()
        loss = loss_sum / tokens.clamp(min=1)
        # Detached copies: the schedule divides `loss` in place.
        return loss, {"lm_loss": loss.detach().clone(), "loss_sum": loss_sum.detach(),
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
                 micro_batch_size: int, forward_only: bool = False):
    """Like `forward_backward`, returning on the last stage {"lm_loss": mean of micro-batch
    means, "loss_sum": summed token losses, "tokens": loss tokens} for this rank."""
    if micro_batches and "cu_seqlens" in micro_batches[0] and uses_thd(get_model_config(model)):
        # THD: one row of b * s positions
        seq_length, micro_batch_size = seq_length * micro_batch_size, 1
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
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


def train_step(ddp, optimizer, micro_batches: list[dict], num_microbatches: int,
               seq_length: int, micro_batch_size: int) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches. Returns, on every rank, the LM loss
    (the objective without the router losses) averaged over data-parallel ranks, and the
    gradient norm before clipping."""
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    stats = run_schedule(ddp, micro_batches, num_microbatches, seq_length, micro_batch_size)
    _, grad_norm, _ = optimizer.step()
    lm = last_stage_sum(None if stats is None else stats["lm_loss"]).item()
    return lm / parallel_state.get_data_parallel_world_size(), float(grad_norm or 0.0)
