"""`pesc bench memory`: `pesc plan`'s per-rank prediction against the peak resident memory of
real training steps on CPU (fp32, gloo).

Each case runs in fresh child processes, one per rank, as `pesc train` would: build_model,
megatron-core DDP and optimizer (Adam, clipping), then several steps of megatron-core's
schedule over packed micro-batches of random tokens (the fused attention by default; cases
named `-local` use megatron-core's unfused one with its mask). Each rank reports its resident size after imports and initialize() (the planner's
CPU runtime term: interpreter, libraries, allocator) and its peak (VmHWM). The prediction is
that baseline plus the planner's formulas for parameters, gradients, optimizer state and
activations. A table is printed; the last stdout line is JSON.

Every case runs under two settings of glibc's malloc, which holds torch's CPU tensors:
`returning` (MALLOC_MMAP_THRESHOLD_=131072: each tensor over 128 KiB is its own mapping, given
back to the system when freed, so the peak is what the tensors need at once) and `glibc`
(its defaults: after the first large free its mmap threshold rises to up to 32 MiB, tensors
below that come from a heap that keeps freed chunks, so the peak adds the heap's
fragmentation, which the planner does not model).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pesc_megatron.analysis.plan import Job, Layout, stage_memory
from pesc_megatron.data import collate
from pesc_megatron.model.builder import build_model
from pesc_megatron.model.config import LORA_TARGETS, LoRAConfig, ModelConfig, PESCConfig
from pesc_megatron.model.size import PRESETS
from pesc_megatron.parallel.config import ParallelConfig
from pesc_megatron.parallel.distributed import destroy, free_port, initialize
from pesc_megatron.schema import ConfigError
from pesc_megatron.train.config import OptimConfig
from pesc_megatron.train.optim import build_optimizer
from pesc_megatron.train.step import run_schedule, wrap_ddp

MiB = 2**20
SMOLLM2 = PRESETS["smollm2-135m"]
# A smaller Llama shape (GQA, untied) for the two-rank layouts.
SMALL = ModelConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=4, vocab_size=16384,
                    max_position_embeddings=1024)
PESC = PESCConfig(num_experts=8, topk=2, adapter_dim=64)
LORA = LoRAConfig(targets=list(LORA_TARGETS), rank=64)
ALLOCATORS = {"returning": {"MALLOC_MMAP_THRESHOLD_": "131072"}, "glibc": {}}
MICRO_BATCHES = 2  # per step and rank: gradient accumulation, as in training
CASES = {  # name: (job, layout)
    "smollm2-8x": (Job(SMOLLM2, PESC, LoRAConfig(), seq=256, micro_batch=2, dtype="fp32",
                       distributed_optimizer=False), Layout()),
    "smollm2-8x-local": (Job(SMOLLM2, PESC, LoRAConfig(), seq=256, micro_batch=2,
                             dtype="fp32", distributed_optimizer=False, attention="local"),
                         Layout()),
    "smollm2-8x-lora": (Job(SMOLLM2, PESC, LORA, seq=256, micro_batch=2, dtype="fp32",
                            distributed_optimizer=False), Layout()),
    "small-8x-lora-tp2-ep2": (Job(SMALL, PESC, LORA, seq=512, micro_batch=2, dtype="fp32",
                                  distributed_optimizer=False), Layout(tp=2, ep=2, world=2)),
    "small-8x-lora-ep2-distopt": (Job(SMALL, PESC, LORA, seq=512, micro_batch=2,
                                      dtype="fp32", distributed_optimizer=True),
                                  Layout(ep=2, world=2)),
}


def _parse(argv):
    p = argparse.ArgumentParser(prog="pesc bench memory", description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: "
                   + ", ".join(CASES))
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per case (Adam's "
                   "state exists from the first step on)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per case, shared "
                   "by its ranks")
    p.add_argument("--allocator", choices=("both", *ALLOCATORS), default="both")
    p.add_argument("--child", help=argparse.SUPPRESS)  # the case a rank runs
    return p.parse_args(argv)


def _status(key: str) -> int:
    """A /proc/self/status size (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def _micro_batches(job: Job, count: int, seed: int) -> list[dict]:
    """Random tokens as packed micro-batches (one sample a sequence), collated as the data
    pipeline collates them."""
    import torch


    g = torch.Generator().manual_seed(seed)
    b, s = job.micro_batch, job.seq
    out = []
    for _ in range(count):
        tokens = torch.randint(0, job.model.vocab_size, (b, s + 1), generator=g)
        out.append(collate([dict(tokens=tokens[i, :-1], labels=tokens[i, 1:],
                                 loss_mask=torch.ones(s),
                                 cu_seqlens=torch.tensor([0, s], dtype=torch.int32))
                            for i in range(b)]))
    return out


def _run_rank(name: str, steps: int, threads: int) -> dict:
    """One rank of case `name`: its baseline and peak resident memory."""
    import gc

    import torch
    from megatron.core import parallel_state as ps

    torch.set_num_threads(threads)
    job, lay = CASES[name]
    par = ParallelConfig(tp=lay.tp, pp=lay.pp, ep=lay.ep, etp=lay.etp)
    initialize(par, seed=1234)
    gc.collect()
    baseline = _status("VmRSS")
    model = build_model(job.model, job.pesc, par, dtype=job.dtype, lora=job.lora,
                        recompute=job.recompute, attention=job.attention, experts=job.experts)
    with torch.no_grad():  # trained adapters are not zero: routing and backward as in training
        for param in model.parameters():
            if param.requires_grad and not param.any():
                param.normal_(0, 0.02)
    ddp = wrap_ddp(model, use_distributed_optimizer=job.distributed_optimizer)
    optimizer = build_optimizer(ddp, OptimConfig(lr=1e-4, clip_grad=0.3,
                                                 distributed=job.distributed_optimizer))
    start = time.perf_counter()
    for step in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        batches = _micro_batches(job, MICRO_BATCHES,
                                 seed=step * 100 + ps.get_data_parallel_rank())
        run_schedule(ddp, batches, MICRO_BATCHES, job.seq, job.micro_batch)
        optimizer.step()
    result = dict(rank=torch.distributed.get_rank(), stage=ps.get_pipeline_model_parallel_rank(),
                  baseline=baseline, peak=_status("VmHWM"),
                  step_s=(time.perf_counter() - start) / steps)
    destroy()
    return result


def _launch(name: str, allocator: str, steps: int, threads: int) -> list[dict]:
    """Runs case `name` on its ranks as child processes; their reports, by rank."""
    world = CASES[name][1].world
    threads = max(1, threads // world)
    port = free_port()
    procs = []
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    for rank in range(world):
        env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
                   **ALLOCATORS[allocator])
        # Files, not pipes: a rank blocked on a full pipe would stall the others' collectives.
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "pesc_megatron.bench.memory", "--child", name,
             "--steps", str(steps), "--threads", str(threads)],
            env=env, stdout=out, stderr=err, text=True), out, err))
    reports = []
    for proc, out, err in procs:
        proc.wait()
        out.seek(0)
        err.seek(0)
        if proc.returncode:  # megatron-core's import notices are shown on failure only
            sys.stderr.write(err.read())
            raise SystemExit(f"pesc bench memory: case {name} ({allocator}) failed (exit "
                             f"{proc.returncode})")
        reports.append(json.loads(out.read().strip().splitlines()[-1]))
    return sorted(reports, key=lambda r: r["rank"])


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        print(json.dumps(_run_rank(args.child, args.steps, args.threads)))
        return 0
    names = args.cases.split(",")
    for name in names:
        if name not in CASES:
            raise ConfigError(f"--cases: unknown case {name!r} (known: {', '.join(CASES)})")
    allocators = list(ALLOCATORS) if args.allocator == "both" else [args.allocator]
    rows = []
    print(f"{'case':<27}{'rank':>4}{'baseline':>9}{'params':>7}{'grads':>6}{'optim':>6}"
          f"{'activ':>6}{'predicted':>10}" + "".join(f"{a:>11}{'error':>7}" for a in allocators)
          + "  (MiB)")
    for name in names:
        job, lay = CASES[name]
        runs = {a: _launch(name, a, args.steps, args.threads) for a in allocators}
        for rank in range(lay.world):
            reports = {a: runs[a][rank] for a in allocators}
            first = reports[allocators[0]]
            # The runtime term is each run's own baseline; the formulas' part is the same.
            parts = stage_memory(job, lay, first["stage"], runtime=0)
            row = dict(case=name, rank=rank, predicted_without_baseline_mib=parts["total"] / MiB,
                       parts_mib={k: v / MiB for k, v in parts.items() if k != "runtime"})
            cells = ""
            for a, report in reports.items():
                predicted = parts["total"] + report["baseline"]
                error = predicted / report["peak"] - 1
                row[a] = dict(baseline_mib=report["baseline"] / MiB, predicted_mib=predicted
                              / MiB, measured_mib=report["peak"] / MiB, error=error,
                              step_s=report["step_s"])
                cells += f"{report['peak'] / MiB:>11.0f}{100 * error:>6.1f}%"
            rows.append(row)
            print(f"{name:<27}{rank:>4}{first['baseline'] / MiB:>9.0f}"
                  f"{(parts['frozen'] + parts['trainable']) / MiB:>7.0f}"
                  f"{parts['gradients'] / MiB:>6.0f}{parts['optimizer'] / MiB:>6.0f}"
                  f"{parts['activations'] / MiB:>6.0f}"
                  f"{(parts['total'] + first['baseline']) / MiB:>10.0f}{cells}")
    worst = {a: max(abs(r[a]["error"]) for r in rows) for a in allocators}
    for a, error in worst.items():
        print(f"{a}: largest |predicted - measured| / measured {100 * error:.1f}%")
    print(json.dumps(dict(rows=rows, max_abs_error=worst, steps=args.steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
