"""`pesc train CONFIG.yaml [key=value ...]`: instruction-tunes the routers and adapters of a PESC
checkpoint with megatron-core's DDP, optimizer, LR schedule and pipeline schedules.

Run it under torchrun (one node or many); rerunning the same command resumes from the newest
checkpoint in `train.out_dir/checkpoints`. Outputs in `train.out_dir`: `metrics.jsonl` (one
row per log interval, plus `valid_loss` rows), `tb/` (TensorBoard), `checkpoints/`.

The objective is megatron-core's: each micro-batch's mean over its loss tokens, averaged over
the micro-batches of a global batch, plus the routers' load-balancing (and z) losses.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from pesc_megatron.checkpoint import atomic, base as pesc_checkpoint, training as train_checkpoint
from pesc_megatron.checkpoint.format import TOKENIZER, TRAIN_META, check_lora, read_info
from pesc_megatron.data import DataError, build_dataset, collate, load_tokenizer
from pesc_megatron.model.attention import resolve_attention
from pesc_megatron.model.config import LoRAConfig, validate_lora
from pesc_megatron.model.fp8 import describe_frozen
from pesc_megatron.model.precision import check_fp8_machine
from pesc_megatron.model.size import count_parameters
from pesc_megatron.parallel.config import validate_layout
from pesc_megatron.parallel.distributed import destroy, initialize, is_rank0, say, set_seed
from pesc_megatron.schema import ConfigError, from_dict
from pesc_megatron.train.config import JobConfig, check_batch_layout, load_job
from pesc_megatron.train.evaluate import evaluate, last_stage_sum
from pesc_megatron.train.metrics import load_imbalance, pop_expert_load, pop_router_losses
from pesc_megatron.train.optim import build_optimizer, build_scheduler
from pesc_megatron.train.profile import profiled
from pesc_megatron.train.step import run_schedule, wrap_ddp



# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------
def build_data(files: list, tokenizer, job: JobConfig, cache_dir: Path, packing: bool):
    """Rank 0 tokenises (or reads the cache), then the others read its cache. A data error on
    rank 0 is sent to every rank, so that all of them stop with the same message."""
    d = job.data
    specs = [f if isinstance(f, str) else (f["path"], f.get("weight", 1.0)) for f in files]
    kwargs = dict(seq_length=d.seq_length, packing=packing, cache_dir=cache_dir,
                  on_error=d.on_error, overlong=d.overlong, seed=job.train.seed)
    error, dataset = [None], None
    if is_rank0():
        try:
            dataset = build_dataset(specs, tokenizer, builder=True, **kwargs)
        except DataError as e:
            error = [str(e)]
        except OSError as e:  # e.g. an unwritable cache_dir: still stop every rank
            error = [f"{e.filename or cache_dir}: {e.strerror or e}"]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise DataError("", error[0])
    if dataset is None:
        dataset = build_dataset(specs, tokenizer, builder=False, **kwargs)
    return dataset


class GlobalBatches:
    """Global batch k holds the sequences at positions [k*gbs, (k+1)*gbs) of the endless
    stream of epochs, each epoch a permutation seeded by (seed, epoch). The order does not
    depend on the parallel layout, so with the same batch size and data (checked on resume)
    the data position is the step."""

    def __init__(self, dataset, global_batch_size: int, seed: int):
        self.dataset, self.gbs, self.seed = dataset, global_batch_size, seed
        self._epoch, self._order_of_epoch = None, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order_of_epoch = np.random.default_rng([self.seed, epoch]).permutation(
                len(self.dataset))
        return self._order_of_epoch

    def indices(self, step: int) -> list[int]:
        n = len(self.dataset)
        return [int(self._order(p // n)[p % n]) for p in range(step * self.gbs,
                                                               (step + 1) * self.gbs)]


def rank_micro_batches(dataset, indices: list[int], micro_batch_size: int) -> list[dict]:
    """This data-parallel rank's consecutive slice of `indices`, as micro-batches."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = len(indices) // dp
    mine = indices[rank * per_rank:(rank + 1) * per_rank]
    return [collate([dataset[i] for i in mine[j:j + micro_batch_size]])
            for j in range(0, len(mine), micro_batch_size)]


# ------------------------------------------------------------------------------------------
# Logging
# ------------------------------------------------------------------------------------------
class Logger:
    """Rank 0 writes metrics.jsonl and TensorBoard; every call is made on all ranks."""

    def __init__(self, out_dir: Path, start_step: int):
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if is_rank0():
            out_dir.mkdir(parents=True, exist_ok=True)
            if self.path.exists():  # drop rows a killed run wrote after its last checkpoint
                rows = [line for line in self.path.read_text().splitlines()
                        if _step_of(line) is not None and _step_of(line) <= start_step]
                atomic.write_text(self.path, "".join(r + "\n" for r in rows))
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1)
            except ImportError:
                print("tensorboard is not installed: metrics.jsonl only", flush=True)

    def write(self, row: dict, layer_load: torch.Tensor | None = None) -> None:
        """Appends `row`; `layer_load` ([layers, experts] tokens routed in the interval, as
        counts or shares) adds each layer's per-expert shares as `expert_load`."""
        if not is_rank0():
            return
        shares = None
        if layer_load is not None:
            total = layer_load.double().sum(dim=1, keepdim=True)
            shares = layer_load.double() / total.clamp(min=1e-30)  # a layer routing none: 0s
            # 6 digits tell collapse from balance and keep a 60-layer, 8-expert row near 5 kB
            row = dict(row, expert_load=[[round(share, 6) for share in layer]
                                         for layer in shares.tolist()])
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is None:
            return
        step = row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(f"train/{key}" if "valid" not in key else key, value, step)
        if shares is not None:
            imbalance = load_imbalance(shares).tolist()
            for layer, load in enumerate(shares.tolist(), start=1):
                for e, share in enumerate(load):
                    self.tb.add_scalar(f"expert_load/layer_{layer:02d}/expert_{e}", share, step)
                self.tb.add_scalar(f"expert_imbalance/layer_{layer:02d}", imbalance[layer - 1],
                                   step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str):
    """The step of a metrics.jsonl row, None for a torn line (a kill during a write)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


# ------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------
# Settings that define the stream of global batches: a resume must not change them.
DATA_STREAM_KEYS = (("data", "train"), ("data", "seq_length"), ("data", "packing"),
                    ("data", "overlong"), ("data", "on_error"), ("train", "global_batch_size"),
                    ("train", "seed"))


def check_resumable(latest: Path, state: dict, job: JobConfig, info) -> None:
    if Path(state["base"]) != info.base.resolve():
        raise ConfigError(f"{latest}: was trained from base {state['base']}, but "
                          f"model.checkpoint is {info.base.resolve()}")
    saved = state["config"]["resolved"]
    saved_lora = from_dict(LoRAConfig, saved.get("lora") or {})
    if saved_lora.shape() != job.lora.shape():
        raise ConfigError(f"lora: {latest} was trained with LoRA "
                          f"{saved_lora.shape()}, the job asks for "
                          f"{job.lora.shape()} (use a new train.out_dir)")
    for section, key in DATA_STREAM_KEYS:
        now = getattr(getattr(job, section), key)
        if saved[section][key] != now:
            raise ConfigError(
                f"{section}.{key}={now!r}: {latest} was trained with {saved[section][key]!r}; "
                "the data order would change (use a new train.out_dir)")


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

    tokenizer = load_tokenizer(job.data.tokenizer or info.base / TOKENIZER)
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
    source = resumed["base"] if resumed else job.model.checkpoint
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

    def save(step: int) -> None:
        train_checkpoint.save(checkpoints, step, model, optimizer, dict(
            base=str(info.base.resolve()),
            init_from=(resumed or {}).get("init_from") or (
                str(info.trained.resolve()) if info.trained else None),
            scheduler=scheduler.state_dict(), consumed_samples=step * gbs,
            config=config_source), job.train.keep_last)
        say(f"saved {checkpoints / train_checkpoint.iter_name(step)}")

    def validate(step: int) -> float:
        loss, tokens = evaluate(ddp, valid_ds, mbs)
        logger.write({"step": step, "valid_loss": loss, "valid_tokens": tokens})
        say(f"step {step}: valid loss {loss:.4f} over {tokens} tokens")
        return loss

    if valid_ds is not None and start == 0:
        validate(0)
    model.train()
    pop_router_losses(1), pop_expert_load(model, num_layers)  # drop counts from loading
    acc = dict(lm=0.0, grad=0.0, time=0.0, tokens=0, steps=0)
    row, begun, run_steps = {}, time.perf_counter(), 0
    for step in range(start + 1, iters + 1):
        t0 = time.perf_counter()
        set_seed(step_seed(job.train.seed, step))
        indices = batches.indices(step - 1)
        micro_batches = rank_micro_batches(train_ds, indices, mbs)
        with profiled(out_dir, step, step == job.train.profile_step):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            stats = run_schedule(ddp, micro_batches, num_mb, seq, mbs)
            _, grad_norm, _ = optimizer.step()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used
        scheduler.step(1)
        lm = last_stage_sum(None if stats is None else stats["lm_loss"]).item()
        acc["lm"] += lm / ps.get_data_parallel_world_size()
        acc["grad"] += float(grad_norm or 0.0)
        acc["tokens"] += sum(train_ds.sample_boundaries(i)[-1] for i in indices)
        acc["time"] += time.perf_counter() - t0
        acc["steps"] += 1
        run_steps += 1
        if step % job.train.log_interval == 0 or step == iters:
            n = acc["steps"]
            router = pop_router_losses(num_mb * n)
            load = pop_expert_load(model, num_layers)
            aux = sum(coeffs[k] * v.sum().item() for k, v in router.items() if coeffs.get(k))
            row = dict(step=step, loss=acc["lm"] / n + aux, lm_loss=acc["lm"] / n,
                       aux_loss=aux, lr=lr,
                       grad_norm=acc["grad"] / n, tokens_per_s=acc["tokens"] / acc["time"],
                       step_time_s=acc["time"] / n,
                       expert_imbalance=load_imbalance(load).mean().item())
            if "load_balancing_loss" in router:  # E * sum f_i P_i, 1.0 = balanced
                row["balance"] = router["load_balancing_loss"].mean().item()
            logger.write(row, load)
            eta = (time.perf_counter() - begun) / run_steps * (iters - step)
            say(f"step {step}/{iters} | loss {row['loss']:.4f} (lm {row['lm_loss']:.4f}, aux "
                f"{aux:.4f}) | lr {row['lr']:.2e} | grad {row['grad_norm']:.3f} | "
                f"{row['tokens_per_s']:.0f} tok/s | {row['step_time_s']:.2f} s/step | "
                f"imbalance {row['expert_imbalance']:.2f} | ETA {_duration(eta)}")
            acc = dict(lm=0.0, grad=0.0, time=0.0, tokens=0, steps=0)
        if valid_ds is not None and job.train.eval_interval and step % job.train.eval_interval == 0 \
                and step != iters:
            validate(step)
        if job.train.save_interval and step % job.train.save_interval == 0 and step != iters:
            save(step)
    if start < iters:
        if valid_ds is not None:
            row = dict(row, valid_loss=validate(iters))
        save(iters)
    else:
        say(f"nothing to do: {checkpoints} is already at step {start} of {iters}")
    logger.close()
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pesc train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML job file (see examples/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value, e.g. optim.lr=1e-4")
    args = ap.parse_args(argv)
    job = load_job(args.config, args.overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = read_info(job.model.checkpoint)
    pesc = dataclasses.replace(info.pesc, **job.pesc)
    try:
        validate_layout(info.model, pesc, job.parallel, world)
        validate_lora(job.lora, info.model)
        check_lora(info, job.lora, job.model.checkpoint)
    except ConfigError as e:
        raise ConfigError(f"{args.config}: {e}") from None
    check_batch_layout(job, world)
    check_fp8_machine(job.precision)
    resolve_attention(job.model.attention)
    if job.model.dtype == "bf16" and not torch.cuda.is_available():
        raise ConfigError("model.dtype=bf16: megatron-core's bf16 optimizer needs a GPU; use "
                          "fp32 on CPU")
    initialize(job.parallel, seed=job.train.seed,
               timeout_minutes=job.train.dist_timeout_minutes)
    try:
        row = run(job, dict(file=str(args.config), overrides=args.overrides,
                            resolved=dataclasses.asdict(job)))
        say(json.dumps(row))
    finally:
        destroy()
    return 0
