"""`pesc plan`: the per-GPU memory of a training layout, and a layout that fits (analysis/plan.py
has the formulas; docs/planner.md derives and checks them)."""
from __future__ import annotations

import argparse
import dataclasses
import json

from pesc_megatron.analysis.info import read_source
from pesc_megatron.analysis.plan import (
    DTYPE_BYTES,
    HEADROOM,
    RECOMPUTE_LEVELS,
    GiB,
    Job,
    Layout,
    candidates,
    layout_error,
    suggest,
)
from pesc_megatron.cli.args import (
    add_lora_args,
    add_parallel_args,
    add_pesc_args,
    lora_from_args,
    pesc_values,
)
from pesc_megatron.model.config import validate_lora
from pesc_megatron.model.precision import LOW_PRECISION
from pesc_megatron.schema import ConfigError


def _parse(argv):
    ap = argparse.ArgumentParser(prog="pesc plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="a preset (llama2-7b, llama2-13b, yi-34b, smollm2-135m), a Hugging Face "
                    "folder or config.json, a PESC checkpoint or run folder, or a job YAML")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    ap.add_argument("--seq-length", "--seq", dest="seq", type=int, default=4096,
                    help="tokens per sequence (default 4096)")
    ap.add_argument("--micro-batch-size", "--micro-batch", dest="micro_batch", type=int,
                    default=1, help="sequences per micro-batch")
    add_parallel_args(ap, ("tp", "pp", "ep"), None, "fix {KEY} (default: searched)")
    add_parallel_args(ap, ("etp",), None, "fix {KEY} (default 1: the adapters are small)")
    add_pesc_args(ap)
    add_lora_args(ap, targets=False, rank_help="LoRA rank (on the source's targets, else all "
                  "seven projections); 0: no LoRA. Default: the source's LoRA (job YAML, "
                  "training checkpoint), else 64 on all seven (the paper's recipe)")
    ap.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16")
    ap.add_argument("--frozen-weights", choices=LOW_PRECISION,
                    help="frozen weight matrices in fp8 (1 byte each + an fp32 scale per row) or "
                    "nf4 (4.13 bits each, and 16 exact columns per layer linear), as "
                    "precision.frozen_weights stores them by default, with the output layer's "
                    "32 high-precision columns; norms stay in --dtype")
    ap.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction,
                    default=True, help="shard optimizer state over data parallel (default on)")
    ap.add_argument("--recompute", choices=RECOMPUTE_LEVELS,
                    help="default: searched with the layout, none before selective before full")
    ap.add_argument("--attention", choices=("sdpa", "local"), default="sdpa",
                    help="model.attention: sdpa (fused; also te's terms) or local (unfused, "
                    "[s, s] scores and mask)")
    return ap.parse_args(argv)


def _job(args) -> Job:
    model, pesc, lora = read_source(args.model)
    pesc = dataclasses.replace(pesc, **pesc_values(args))
    lora = lora_from_args(args, lora, default_rank=64)
    validate_lora(lora, model)
    for key in ("gpus_per_node", "nodes", "seq", "micro_batch"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')}={getattr(args, key)}: must be >= 1")
    if args.gpu_memory <= 0:
        raise ConfigError(f"--gpu-memory={args.gpu_memory}: must be > 0")
    return Job(model, pesc, lora, seq=args.seq, micro_batch=args.micro_batch, dtype=args.dtype,
               frozen_weights=args.frozen_weights, distributed_optimizer=args.distributed_optimizer,
               recompute=args.recompute or "none", attention=args.attention)


def _table(job: Job, lay: Layout, recompute: str, memory: dict, gpu_bytes: float) -> list:
    in_flight = lay.pp - memory["stage"]
    sharded = f" /{lay.dp} (experts /{lay.expert_dp})" if job.distributed_optimizer else ""
    stored = job.frozen_weights.upper() if job.frozen_weights else job.dtype
    rows = [(f"frozen base, {stored}",
             memory["frozen"]),
            ("routers, adapters, LoRA", memory["trainable"]),
            ("gradient buffer, fp32", memory["gradients"]),
            ("optimizer: " + ("fp32 master + " if job.dtype != "fp32" else "") + "Adam m, v"
             + sharded, memory["optimizer"]),
            (f"activations: {in_flight} micro-batch{'es' if in_flight > 1 else ''} in flight, "
             f"recompute {recompute}",
             memory["activations"]),
            ("runtime: CUDA context, NCCL, workspaces (assumed)", memory["runtime"])]
    lines = [f"  {label:<62}{value / GiB:>7.1f} GiB" for label, value in rows]
    verdict = "fits" if memory["total"] <= gpu_bytes else "does NOT fit"
    lines.append(f"  {'total':<62}{memory['total'] / GiB:>7.1f} GiB of {gpu_bytes / GiB:g}: "
                 f"{verdict} ({100 * (1 - memory['total'] / gpu_bytes):.0f}% free)")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    job = _job(args)
    world, gpu_bytes = args.gpus_per_node * args.nodes, args.gpu_memory * GiB
    fixed = {k: getattr(args, k) for k in ("tp", "pp", "ep", "etp") if getattr(args, k) is not None}
    if fixed:  # the sizes the user fixed must be possible by themselves
        error = layout_error(job, Layout(world=world, **fixed))
        if error:
            raise ConfigError(error)
    layouts = candidates(job, world, args.gpus_per_node, fixed)
    if not layouts:
        raise ConfigError(f"no valid layout of {world} GPUs with {fixed or 'any sizes'} for "
                          f"{args.model} (TP is kept within a node of {args.gpus_per_node})")
    fixed_layout = {"tp", "pp", "ep"} <= set(fixed)  # pinned (ETP 1): a verdict, no search
    levels = [args.recompute or "none"] if fixed_layout else (
        [args.recompute] if args.recompute else RECOMPUTE_LEVELS)
    (lay, recompute, memory), with_headroom = suggest(job, layouts, gpu_bytes, levels)
    m, p = job.model, job.pesc
    lora = f"LoRA r={job.lora.rank} on {len(job.lora.targets)} projections" \
        if job.lora.enabled else "no LoRA"
    print(f"pesc plan: {args.model} (hidden {m.hidden_size}, {m.num_hidden_layers} layers), "
          f"{p.num_experts} experts top-{p.topk} adapter {p.adapter_dim}, {lora}; {job.dtype}, "
          f"seq {job.seq} x micro-batch {job.micro_batch}; {args.nodes} node(s) x "
          f"{args.gpus_per_node} GPUs of {args.gpu_memory:g} GiB")
    if job.frozen_weights:
        print(f"  --frozen-weights {job.frozen_weights}: the frozen weights as "
              f"precision.frozen_weights: {job.frozen_weights} stores them by default, with the "
              "output layer's 32 high-precision columns (nf4: and 16 exact columns per layer "
              "linear); its activations are not measured by "
              "`pesc bench memory`")
    label = "layout" if fixed_layout else (
        "suggested layout" if with_headroom else "nothing fits; the smallest layout")
    print(f"{label}: TP {lay.tp}, PP {lay.pp}, EP {lay.ep}, ETP {lay.etp} -> DP {lay.dp}, "
          f"expert DP {lay.expert_dp}; recompute {recompute}"
          + (f" ({len(layouts)} layouts searched; rule: the least model parallelism that "
             f"leaves {HEADROOM:.0%} free)" if not fixed_layout else ""))
    print(f"per GPU (pipeline stage {memory['stage']} of {lay.pp}):")
    for line in _table(job, lay, recompute, memory, gpu_bytes):
        print(line)
    print(json.dumps(dict(
        model=args.model, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        gpu_memory_gib=args.gpu_memory, seq=job.seq, micro_batch=job.micro_batch,
        dtype=job.dtype, frozen_weights=job.frozen_weights, lora_rank=job.lora.rank if job.lora.enabled
        else 0, num_experts=p.num_experts, topk=p.topk, adapter_dim=p.adapter_dim,
        distributed_optimizer=job.distributed_optimizer,
        layout=dict(tp=lay.tp, pp=lay.pp, ep=lay.ep, etp=lay.etp, dp=lay.dp,
                    expert_dp=lay.expert_dp),
        recompute=recompute, suggested=not fixed_layout,
        fits=memory["total"] <= gpu_bytes, fits_with_headroom=with_headroom,
        per_gpu_gib={k: round(v / GiB, 2) for k, v in memory.items() if k != "stage"},
        stage=memory["stage"])))
    return 0
