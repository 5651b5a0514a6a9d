"""The training run behind `pesc train`: instruction-tunes the routers and adapters (and LoRA)
of a PESC checkpoint with megatron-core's DDP, optimizer, LR schedule and pipeline schedules,
resuming from the newest checkpoint in `train.out_dir/checkpoints`.

The objective is the mean token loss over the loss tokens of each global batch (with
`train.per_token_loss: false`, megatron-core's default: each micro-batch's mean over its loss
tokens, averaged over the micro-batches), plus the routers' load-balancing (and z) losses
averaged over the micro-batches.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from pesc_megatron.analysis.balance import load_imbalance
from pesc_megatron.checkpoint import base as pesc_checkpoint, training as train_checkpoint
from pesc_megatron.checkpoint.format import (
    TOKENIZER,
    TRAIN_META,
    base_paths,
    find_base,
    is_base_of,
    read_info,
)
from pesc_megatron.data import load_tokenizer
from pesc_megatron.model.config import LoRAConfig
from pesc_megatron.model.quantized import describe_frozen
from pesc_megatron.model.size import count_parameters
from pesc_megatron.parallel.distributed import is_rank0, max_over_ranks, say, set_seed
from pesc_megatron.schema import ConfigError, from_dict
from pesc_megatron.train import preemption
from pesc_megatron.train.batches import GlobalBatches, build_data, rank_micro_batches
from pesc_megatron.train.config import JobConfig, check_batch_layout
from pesc_megatron.train.evaluate import evaluate
from pesc_megatron.train.logger import Logger
from pesc_megatron.train.metrics import pop_expert_load, pop_router_losses
from pesc_megatron.train.optim import build_optimizer, build_scheduler
from pesc_megatron.train.preemption import Preempted
from pesc_megatron.train.profile import profiled
from pesc_megatron.train.step import state_is_finite, train_step, wrap_ddp


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


# Settings that define the stream of global batches: a resume must not change them.
DATA_STREAM_KEYS = (("data", "train"), ("data", "seq_length"), ("data", "packing"),
                    ("data", "overlong"), ("data", "on_error"), ("data", "loss_on"),
                    ("data", "chat_template"), ("train", "global_batch_size"), ("train", "seed"))


def check_resumable(latest: Path, state: dict, job: JobConfig, info) -> None:
    """The job continues the run in `latest`: same base, LoRA shape and data stream. A base
    no longer where the run recorded it (moved) is the job's model.checkpoint."""
    try:
        recorded = find_base(latest, state).resolve()
    except ConfigError:
        if not is_base_of(info.base, state):
            raise ConfigError(f"model.checkpoint: {info.base} is not the base {latest} was "
                              "trained from (its pesc.json or hf_config.json differ)") from None
        say(f"{latest}: its recorded base ({state['base']}) is missing: resuming on "
            f"model.checkpoint's base {info.base}")
        recorded = info.base.resolve()
    if recorded != info.base.resolve():
        raise ConfigError(f"{latest}: was trained from base {recorded}, but "
                          f"model.checkpoint is {info.base.resolve()}")
    saved = state["config"]["resolved"]
    saved_lora = from_dict(LoRAConfig, saved.get("lora") or {})
    if saved_lora.shape() != job.lora.shape():
        raise ConfigError(f"lora: {latest} was trained with LoRA "
                          f"{saved_lora.shape()}, the job asks for "
                          f"{job.lora.shape()} (use a new train.out_dir)")
    for section, key in DATA_STREAM_KEYS:
        now = getattr(getattr(job, section), key)
        # (a run saved before a key existed was trained with its default)
        then = saved[section].get(key, getattr(getattr(JobConfig(), section), key))
        if then != now:
            raise ConfigError(
                f"{section}.{key}={now!r}: {latest} was trained with {then!r}; "
                "the data order would change (use a new train.out_dir)")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with non-finite losses or gradients (train.max_skipped_steps);
    its message is one line."""


# Fault injection for tests: the steps whose gradients rank 0 makes NaN ("3,4").
FAULT_STEPS_ENV = "PESC_FAULT_NONFINITE_STEPS"


def fault_steps() -> set[int]:
    return {int(s) for s in os.environ.get(FAULT_STEPS_ENV, "").split(",") if s.strip()}


def new_interval() -> dict:
    """The sums of one log interval: losses and norms over the steps that updated."""
    return dict(lm=0.0, grad=0.0, time=0.0, tokens=0, steps=0, updates=0, skipped=0)


def step_seed(seed: int, step: int) -> int:
    return seed + 7919 * step


def run(job: JobConfig, config_source: dict) -> dict:
    """Trains on this rank's part of the job (torch.distributed initialised). Returns the
    final metrics row."""
    out_dir = Path(job.train.out_dir)
    checkpoints = out_dir / "checkpoints"
    info = read_info(job.model.checkpoint)
    num_mb = check_batch_layout(job, dist.get_world_size())
    mbs, gbs, seq = job.train.micro_batch_size, job.train.global_batch_size, job.data.seq_length

    tokenizer = load_tokenizer(job.data.tokenizer or info.base / TOKENIZER,
                               job.data.chat_template)
    cache_dir = Path(job.data.cache_dir or out_dir / "token_cache")
    train_ds = build_data(job.data.train, tokenizer, job, cache_dir, job.data.packing)
    valid_ds = (build_data(job.data.valid, tokenizer, job, cache_dir, job.data.packing)
                if job.data.valid else None)
    iters = job.train.iters or max(1, len(train_ds) // gbs)
    say(f"data: train {train_ds.stats.summary()}")
    if valid_ds is not None:
        say(f"data: valid {valid_ds.stats.summary()}")

    latest = train_checkpoint.find_latest(checkpoints)
    resumed = json.loads((latest / TRAIN_META).read_text()) if latest else None
    if resumed is not None:
        check_resumable(latest, resumed, job, info)
    # On resume the routers and adapters come from our own checkpoint: build from the base.
    source = info.base if resumed else job.model.checkpoint
    model, info = pesc_checkpoint.load(source, job.parallel, job.model.dtype,
                                       pesc_overrides=job.pesc, lora=job.lora,
                                       precision=job.precision,
                                       recompute=job.model.recompute,
                                       attention=job.model.attention,
                                       experts=job.model.experts)
    say(describe_frozen(model))
    ddp = wrap_ddp(model, use_distributed_optimizer=job.optim.distributed)
    optimizer = build_optimizer(ddp, job.optim, job.model.dtype)
    scheduler = build_scheduler(optimizer, job.optim, iters)
    if job.optim.warmup_steps >= iters:
        say(f"warning: optim.warmup_steps={job.optim.warmup_steps} >= {iters} steps: the run "
            f"never reaches optim.lr={job.optim.lr}")

    start = 0
    if resumed is not None:
        train_checkpoint.load(latest, model, optimizer)
        start = resumed["iteration"]
        scheduler.load_state_dict(resumed["scheduler"])  # the step; the job's settings win
        say(f"resumed from {latest} at step {start}")

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    par = job.parallel
    counts = count_parameters(info.model, info.pesc, info.lora)
    say(f"pesc train: world {dist.get_world_size()} (tp {par.tp}, pp {par.pp}, ep {par.ep}, "
        f"dp {ps.get_data_parallel_world_size()}), {iters} steps of {gbs} sequences x {seq} "
        f"(micro-batch {mbs}, {num_mb} per rank)")
    say(f"parameters: trainable {counts['trainable']:,} of {counts['total']:,} (routers "
        f"{counts['routers']:,}, adapters {counts['adapters']:,}, LoRA {counts['lora']:,}); "
        f"on rank 0 {trainable:,} of {total:,}")

    logger = Logger(out_dir, start)
    batches = GlobalBatches(train_ds, gbs, job.train.seed)
    num_layers = info.model.num_hidden_layers
    coeffs = {"load_balancing_loss": info.pesc.aux_loss_coeff, "z_loss": info.pesc.z_loss_coeff}

    # train.async_save: megatron-core's queue of background saves (one at a time here)
    saves = AsyncCallsQueue() if job.train.async_save else None

    def save(step: int, last: bool = False) -> None:
        """A checkpoint of `step`; in the background with train.async_save unless `last`
        (the end of the run, or a preemption: the process exits next)."""
        if not state_is_finite(model, optimizer):  # never a checkpoint one cannot resume from
            raise NonFiniteError(f"not saving step {step}: the trainable weights or the "
                                 f"optimizer state hold non-finite values; the newest "
                                 f"checkpoint in {checkpoints} is the last finite one")
        if saves is not None:
            saves.maybe_finalize_async_calls(blocking=True)  # the previous one completes first
        background = saves is not None and not last
        target = train_checkpoint.save(checkpoints, step, model, optimizer, dict(
            **base_paths(checkpoints / train_checkpoint.iter_name(step), info.base),
            init_from=(resumed or {}).get("init_from") or (
                str(info.trained.resolve()) if info.trained else None),
            scheduler=scheduler.state_dict(), consumed_samples=step * gbs,
            config=config_source), job.train.keep_last, saves if background else None)
        say(f"{'saving' if background else 'saved'} {target}"
            + (" in the background" if background else ""))

    def validate(step: int) -> float:
        loss, tokens = evaluate(ddp, valid_ds, mbs)
        logger.write({"step": step, "valid_loss": loss, "valid_tokens": tokens})
        say(f"step {step}: valid loss {loss:.4f} over {tokens} tokens")
        return loss

    if valid_ds is not None and start == 0:
        validate(0)
    model.train()
    pop_router_losses(1), pop_expert_load(model, num_layers)  # drop counts from loading
    acc = new_interval()
    row, begun, run_steps, skipped_in_row = {}, time.perf_counter(), 0, 0
    save_time = 0.0  # training time spent in saves since the last logged row
    faults = fault_steps()
    preemption.record_signals()  # (already, under the CLI)
    try:
        for step in range(start + 1, iters + 1):
            t0 = time.perf_counter()
            set_seed(step_seed(job.train.seed, step))
            indices = batches.indices(step - 1)
            micro_batches = rank_micro_batches(train_ds, indices, mbs)
            with profiled(out_dir, step, step == job.train.profile_step):
                lm, grad_norm, skipped = train_step(
                    ddp, optimizer, micro_batches, num_mb, seq, mbs,
                    per_token=job.train.per_token_loss, poison=step in faults and is_rank0())
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used
            if skipped:
                skipped_in_row += 1
                acc["skipped"] += 1
                # its router losses and loads may be non-finite too: left out of the row
                pop_router_losses(1), pop_expert_load(model, num_layers)
                say(f"step {step}: non-finite loss or gradients (lm loss {lm}): skipped, no update "
                    f"({skipped_in_row} in a row; train.max_skipped_steps="
                    f"{job.train.max_skipped_steps})")
                if skipped_in_row >= job.train.max_skipped_steps:
                    raise NonFiniteError(
                        f"train.max_skipped_steps={job.train.max_skipped_steps}: steps "
                        f"{step - skipped_in_row + 1}-{step} all had non-finite losses or "
                        f"gradients; stopping (the newest checkpoint in {checkpoints} holds finite "
                        "weights: lower optim.lr or check the data)")
            else:
                skipped_in_row = 0
                scheduler.step(1)
                acc["lm"] += lm
                acc["grad"] += grad_norm
                acc["updates"] += 1
            acc["tokens"] += sum(train_ds.sample_boundaries(i)[-1] for i in indices)
            acc["time"] += time.perf_counter() - t0
            acc["steps"] += 1
            run_steps += 1
            if step % job.train.log_interval == 0 or step == iters:
                n, updates = acc["steps"], max(acc["updates"], 1)
                router = pop_router_losses(num_mb * updates)
                load = pop_expert_load(model, num_layers)
                aux = sum(coeffs[k] * v.sum().item() for k, v in router.items() if coeffs.get(k))
                # the losses and norms of the steps that updated (all NaN: every step skipped)
                lm_mean = acc["lm"] / updates if acc["updates"] else float("nan")
                row = dict(step=step, loss=lm_mean + aux, lm_loss=lm_mean,
                           aux_loss=aux, lr=lr, grad_norm=acc["grad"] / updates if acc["updates"]
                           else float("nan"), tokens_per_s=acc["tokens"] / acc["time"],
                           step_time_s=acc["time"] / n,
                           expert_imbalance=load_imbalance(load).mean().item(),
                           skipped_steps=acc["skipped"], save_time_s=save_time)
                save_time = 0.0
                if "load_balancing_loss" in router:  # E * sum f_i P_i, 1.0 = balanced
                    row["balance"] = router["load_balancing_loss"].mean().item()
                logger.write(row, load)
                eta = (time.perf_counter() - begun) / run_steps * (iters - step)
                say(f"step {step}/{iters} | loss {row['loss']:.4f} (lm {row['lm_loss']:.4f}, aux "
                    f"{aux:.4f}) | lr {row['lr']:.2e} | grad {row['grad_norm']:.3f} | "
                    f"{row['tokens_per_s']:.0f} tok/s | {row['step_time_s']:.2f} s/step | "
                    f"imbalance {row['expert_imbalance']:.2f} | ETA {_duration(eta)}"
                    + (f" | skipped {acc['skipped']}" if acc["skipped"] else ""))
                acc = new_interval()
            eval_every = job.train.eval_interval
            if valid_ds is not None and eval_every and step % eval_every == 0 and step != iters:
                validate(step)
            saved = job.train.save_interval and step % job.train.save_interval == 0
            if saved and step != iters:
                t_save = time.perf_counter()
                save(step)
                save_time += time.perf_counter() - t_save
            elif saves is not None:
                saves.maybe_finalize_async_calls(blocking=False)  # moves `latest` when done
            signum = int(max_over_ranks(preemption.received()))
            if signum and step != iters:
                if not saved:
                    save(step, last=True)
                elif saves is not None:
                    saves.maybe_finalize_async_calls(blocking=True)
                raise Preempted(f"preempted by {signal.Signals(signum).name} at step {step} of "
                                f"{iters}: saved {checkpoints / train_checkpoint.iter_name(step)}; "
                                "rerun the same command to resume")
        if start < iters:
            if valid_ds is not None:
                row = dict(row, valid_loss=validate(iters))
            save(iters, last=True)
        else:
            say(f"nothing to do: {checkpoints} is already at step {start} of {iters}")
    finally:  # after the last save: a signal during it must not kill a rank mid-write
        preemption.restore()
    logger.close()
    return row
