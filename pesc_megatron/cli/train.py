"""`pesc train CONFIG.yaml [key=value ...]`: instruction-tunes the routers and adapters of a PESC
checkpoint (train/trainer.py). Run it under torchrun (one node or many); rerunning the same
command resumes from the newest checkpoint in `train.out_dir/checkpoints`. Outputs in
`train.out_dir`: `metrics.jsonl` (one row per log interval, plus `valid_loss` rows), `tb/`
(TensorBoard), `checkpoints/`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from pesc_megatron.checkpoint.format import check_lora, read_info
from pesc_megatron.model.attention import resolve_attention
from pesc_megatron.model.config import validate_lora
from pesc_megatron.model.precision import check_fp8_machine
from pesc_megatron.parallel.config import validate_layout
from pesc_megatron.parallel.distributed import destroy, initialize, say
from pesc_megatron.schema import ConfigError
from pesc_megatron.train.config import check_batch_layout, load_job
from pesc_megatron.train.preemption import EXIT_PREEMPTED, Preempted
from pesc_megatron.train.trainer import NonFiniteError, run

# `pesc train` stopped by train.max_skipped_steps consecutive non-finite steps.
EXIT_NON_FINITE = 3


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
    except NonFiniteError as e:  # every rank stops here together; rank 0 says why
        say(f"pesc train: error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    except Preempted as e:
        say(f"pesc train: {e}")
        return EXIT_PREEMPTED
    finally:
        destroy()
    return 0
