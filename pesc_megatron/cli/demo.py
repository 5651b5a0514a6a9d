"""`pesc demo`: crafts a small random Llama-shaped model into PESC experts, shows that it
computes the dense model, then trains only the routers and adapters on a synthetic next-token
task (train/demo.py). Run under torchrun; with 2 ranks it uses expert parallelism (EP=2).
Exits 1 if the loss did not fall."""
from __future__ import annotations

import argparse
import os

from pesc_megatron.cli.args import add_parallel_args, add_pesc_args, pesc_values
from pesc_megatron.model.config import PESCConfig
from pesc_megatron.parallel.config import ParallelConfig, data_parallel_size
from pesc_megatron.train.demo import run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pesc demo", description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq-length", "--seq", dest="seq", type=int, default=64)
    ap.add_argument("--num-micro-batches", "--micro-batches", dest="micro_batches", type=int,
                    default=4, help="per data-parallel rank")
    ap.add_argument("--lr", type=float, default=1e-2)
    add_pesc_args(ap, defaults=dict(num_experts=8, topk=2, adapter_dim=32))
    add_parallel_args(ap, ("tp", "pp"))
    add_parallel_args(ap, ("ep",), 0, "parallel.ep (default: the data-parallel size)")
    args = ap.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = data_parallel_size(ParallelConfig(tp=args.tp, pp=args.pp), world)
    par = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep or dp)
    pesc = PESCConfig(**pesc_values(args), adapter_dropout=0.0)
    summary = run(args, pesc, par, world)
    return 0 if summary["last_loss"] < summary["first_loss"] else 1
