"""`pesc bench layer`: forward+backward time of one PESC MoE layer vs. its frozen dense FFN.

All variants run in one process on the same layer: "pesc" is the whole PESCMoELayer (router,
dispatcher, adapter experts as grouped GEMMs, combine), "pesc_sequential" the same layer with
megatron-core's per-expert loop (`--expert-impls`), "dense" is that layer's own
`shared_experts` SwiGLU FFN called alone. As in a PESC fine-tune, only the router and the adapters require grad, and the
input requires grad (as inside a layer stack), so the dense backward computes the input
gradient only. After a warmup the two are timed interleaved (A B A B ...) and the medians
compared. A short table is printed, then one JSON object as the last stdout line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from pesc_megatron.cli.args import add_pesc_args
from pesc_megatron.model.builder import DTYPES, transformer_config
from pesc_megatron.model.config import ModelConfig, PESCConfig
from pesc_megatron.model.roles import freeze_base
from pesc_megatron.model.spec import pesc_mlp_spec
from pesc_megatron.parallel import distributed
from pesc_megatron.parallel.config import ParallelConfig



def _parse(argv):
    p = argparse.ArgumentParser(prog="pesc bench layer", description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    add_pesc_args(p, ("num_experts", "topk"), dict(num_experts=PESCConfig.num_experts,
                                                   topk=PESCConfig.topk))
    p.add_argument("--adapter-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32")
    p.add_argument("--dispatcher", choices=("alltoall", "allgather"), default="alltoall")
    p.add_argument("--adapter-dropout", type=float, default=0.1,
                   help="applied in train mode, as in a real run (default 0.1)")
    p.add_argument("--expert-impls", default="grouped,sequential",
                   help="adapter expert implementations to time (grouped, sequential)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def _build_layer(a):
    """One PESCMoELayer, frozen as `roles.freeze_base` freezes it inside a GPTModel."""
    from megatron.core.transformer.spec_utils import build_module


    model = ModelConfig(hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=1,
                        num_attention_heads=1)
    pesc = PESCConfig(num_experts=a.num_experts, topk=a.topk, adapter_dim=a.adapter_dim,
                      adapter_dropout=a.adapter_dropout, dispatcher=a.dispatcher)
    cfg = transformer_config(model, pesc, ParallelConfig(), a.dtype)
    layer = build_module(pesc_mlp_spec(), config=cfg, layer_number=1)
    freeze_base(layer)
    with torch.no_grad():  # fresh adapters have W_up == 0; a trained one does not
        for expert in layer.experts.local_experts:
            expert.linear_fc2.weight.normal_(0.0, 0.02)
    return layer.train()


def _flops(a) -> dict:
    """Matmul FLOPs of one forward+backward (elementwise ops, routing and copies excluded)."""
    h, f, t, r, k, e = a.hidden, a.ffn, a.tokens, a.adapter_dim, a.topk, a.num_experts
    dense = 6 * h * f * t * 2  # SwiGLU fwd (3 GEMMs) + bwd input grads only (frozen weights)
    adapters = 4 * h * r * k * t * 3  # down+up per routed row; bwd = input + weight grads
    router = 2 * h * e * t * 3  # logits; bwd = input + weight grads
    return {"dense": dense, "pesc": dense + adapters + router}


def _timed(fn) -> tuple[float, float]:
    """Wall time and this process's CPU time (all threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    load_before = os.getloadavg()[0]  # well above 0: other processes compete for the cores
    if a.threads:
        torch.set_num_threads(a.threads)
    import megatron.core


    owns_dist = not dist.is_initialized()
    distributed.initialize(ParallelConfig(), seed=a.seed)
    try:
        layer = _build_layer(a)

        dtype = DTYPES[a.dtype]
        gen = torch.Generator().manual_seed(a.seed)
        x = torch.randn(a.tokens, 1, a.hidden, generator=gen).to(dtype).requires_grad_()
        grad_out = torch.randn(x.shape, generator=gen).to(dtype)
        trainable = [p for p in layer.parameters() if p.requires_grad]

        def step(forward):
            x.grad = None
            for p in trainable:
                p.grad = None
            forward().backward(grad_out)  # the aux loss joins the backward via its autoscaler

        def pesc(grouped: bool):
            layer.experts.grouped = grouped
            return layer(x)[0]

        impls = a.expert_impls.split(",")
        variants = {"dense": lambda: step(lambda: layer.shared_experts(x))}
        if "grouped" in impls:
            variants["pesc"] = lambda: step(lambda: pesc(True))
        if "sequential" in impls:
            variants["pesc_sequential"] = lambda: step(lambda: pesc(False))
        for _ in range(a.warmup):
            for fn in variants.values():
                fn()
        times = {name: [] for name in variants}
        cpu_times = {name: [] for name in variants}
        for _ in range(a.repeats):
            for name, fn in variants.items():
                wall, cpu = _timed(fn)
                times[name].append(wall)
                cpu_times[name].append(cpu)
    finally:
        if owns_dist:
            distributed.destroy()

    flops = _flops(a)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    main_variant = "pesc" if "pesc" in med else "pesc_sequential"
    result = {
        "bench": "layer",
        "config": {**vars(a), "train_mode": True,
                   "aux_loss_coeff": layer.config.moe_aux_loss_coeff},
        "pesc_median_s": med[main_variant], "dense_median_s": med["dense"],
        "ratio": med[main_variant] / med["dense"],
        "ratio_sequential": med["pesc_sequential"] / med["dense"]
        if "pesc_sequential" in med else None,
        # Less sensitive to other processes on the machine, which stall the many small
        # multi-threaded ops of the PESC path far more than the few large dense GEMMs.
        "ratio_of_mins": min(times[main_variant]) / min(times["dense"]),
        # Median CPU-time ratio: with --threads 1 it does not count time spent descheduled.
        "ratio_cpu_time": statistics.median(cpu_times[main_variant])
        / statistics.median(cpu_times["dense"]),
        "expected_arithmetic_ratio": flops["pesc"] / flops["dense"],
        "pesc_gflop": flops["pesc"] / 1e9, "dense_gflop": flops["dense"] / 1e9,
        "pesc_gflops_per_s": flops["pesc"] / med[main_variant] / 1e9,
        "dense_gflops_per_s": flops["dense"] / med["dense"] / 1e9,
        "times_s": times,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_1m_before": load_before,
        "torch": torch.__version__, "megatron_core": megatron.core.__version__,
    }
    print(f"{'variant':<16}{'median ms':>11}{'min ms':>9}{'GFLOP':>8}{'GFLOP/s':>9}")
    for name in med:
        work = flops["dense" if name == "dense" else "pesc"]
        print(f"{name:<16}{med[name] * 1e3:>11.1f}{min(times[name]) * 1e3:>9.1f}"
              f"{work / 1e9:>8.1f}{work / med[name] / 1e9:>9.1f}")
    print(f"ratio {main_variant}/dense {result['ratio']:.3f} (of mins {result['ratio_of_mins']:.3f}, "
          f"cpu time {result['ratio_cpu_time']:.3f}, "
          f"arithmetic {result['expected_arithmetic_ratio']:.3f}); {a.tokens} tokens, {a.dtype}, "
          f"{a.dispatcher}, {result['torch_threads']} threads, load {load_before:.1f}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
