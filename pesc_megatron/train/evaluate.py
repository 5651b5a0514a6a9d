"""`pesc eval --ckpt CKPT --data FILE ...`: mean loss over the loss tokens of a data file, for a
base or a training checkpoint, at any parallel layout. Run under torchrun for TP/PP/EP > 1.
The last stdout line is JSON: {"loss", "tokens", "records"}.

Records follow the training formats (data/formats.py): text records score every next-token
prediction (`ids = tokenizer(text).input_ids + [eos_id]`), the others their targets only.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from pesc_megatron.checkpoint import base as checkpoint
from pesc_megatron.checkpoint.format import TOKENIZER, read_info
from pesc_megatron.data import build_dataset, collate, load_tokenizer
from pesc_megatron.model.attention import resolve_attention
from pesc_megatron.model.fp8 import describe_frozen
from pesc_megatron.model.precision import (
    FP8_MATMULS,
    FROZEN_WEIGHTS,
    PrecisionConfig,
    check_fp8_machine,
    validate_precision,
)
from pesc_megatron.parallel.config import ParallelConfig, validate_layout
from pesc_megatron.parallel.distributed import destroy, device, initialize, say
from pesc_megatron.schema import ConfigError
from pesc_megatron.train.config import ATTENTIONS
from pesc_megatron.train.step import forward_only


def padding_item(dataset) -> dict:
    """A sequence with no loss token, to fill the last evaluation step."""
    item = dict(dataset[0])
    item["loss_mask"] = torch.zeros_like(item["loss_mask"])
    return item


# ------------------------------------------------------------------------------------------
# Evaluation (also `pesc eval`)
# ------------------------------------------------------------------------------------------
def last_stage_sum(value: torch.Tensor | float | None) -> torch.Tensor:
    """Sum over data-parallel ranks of a value held identically by every tensor-parallel rank
    of the last pipeline stage: an all-reduce over the world, where the other stages give 0
    (pass None there), divided by the tensor-parallel size."""
    t = torch.zeros(1, dtype=torch.float64, device=device())
    if value is not None:
        t += torch.as_tensor(value, dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t / ps.get_tensor_model_parallel_world_size()


def evaluate(model, dataset, micro_batch_size: int) -> tuple[float, int]:
    """(mean loss over all loss tokens of `dataset`, number of loss tokens)."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    num_mb = max(1, math.ceil(len(dataset) / (micro_batch_size * dp)))
    per_rank = num_mb * micro_batch_size
    pad = padding_item(dataset)
    items = [dataset[i] if i < len(dataset) else pad
             for i in range(rank * per_rank, (rank + 1) * per_rank)]
    batches = [collate(items[j:j + micro_batch_size]) for j in range(0, per_rank,
                                                                       micro_batch_size)]
    stats = forward_only(model, batches, dataset.seq_length, micro_batch_size)
    loss_sum = last_stage_sum(None if stats is None else stats["loss_sum"])
    tokens = last_stage_sum(None if stats is None else stats["tokens"])
    return (loss_sum / tokens.clamp(min=1)).item(), int(tokens.round().item())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pesc eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="base or training checkpoint (or run folder)")
    ap.add_argument("--data", required=True, nargs="+", help="JSONL/JSON files")
    ap.add_argument("--seq-length", type=int, default=1024,
                    help="longer samples are truncated (counted in the summary line)")
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--no-packing", dest="packing", action="store_false",
                    help="one sample per sequence (the loss is the same; packing is faster)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--frozen-weights", choices=FROZEN_WEIGHTS,
                    help="storage of the frozen base (default: --dtype); fp8: torchao e4m3")
    ap.add_argument("--fp8-matmul", choices=FP8_MATMULS, default="auto",
                    help="with --frozen-weights fp8: scaled_mm (FP8 products, default on "
                         "GPUs with FP8) or dequantize (high-precision products)")
    defaults = PrecisionConfig()
    ap.add_argument("--fp8-output-layer", action=argparse.BooleanOptionalAction,
                    default=defaults.fp8_output_layer,
                    help="with --frozen-weights fp8: the output layer (or tied embedding) too "
                         "(default: yes)")
    ap.add_argument("--fp8-output-outliers", type=int, default=defaults.fp8_output_outliers,
                    help="with --fp8-output-layer: hidden columns of the output layer kept in "
                         "high precision (default %(default)s)")
    ap.add_argument("--tokenizer", help="default: the checkpoint's tokenizer/ folder")
    ap.add_argument("--cache-dir", help="token cache (default: none, tokenise in memory)")
    ap.add_argument("--attention", choices=ATTENTIONS, default="auto",
                    help="core attention (as model.attention): auto, sdpa, local or te")
    for key in ("tp", "pp", "ep", "etp"):
        ap.add_argument(f"--{key}", type=int, default=1)
    args = ap.parse_args(argv)


    par = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    if par.sequence_parallel and args.seq_length % par.tp:
        ap.error(f"--seq-length {args.seq_length} is not divisible by --tp {par.tp} (sequence "
                 "parallelism splits every sequence over the TP ranks)")
    if args.frozen_weights not in (None, "fp8", args.dtype):
        ap.error(f"--frozen-weights {args.frozen_weights}: the base computes in --dtype "
                 f"{args.dtype}; use {args.dtype} or fp8")
    precision = PrecisionConfig(frozen_weights=args.frozen_weights, fp8_matmul=args.fp8_matmul,
                                fp8_output_layer=args.fp8_output_layer,
                                fp8_output_outliers=args.fp8_output_outliers)
    validate_precision(precision, args.dtype)
    check_fp8_machine(precision)
    resolve_attention(args.attention, "--attention")
    info = read_info(args.ckpt)
    try:
        validate_layout(info.model, info.pesc, par, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        raise ConfigError(f"{args.ckpt}: {e}") from None
    tokenizer = load_tokenizer(args.tokenizer or info.base / TOKENIZER)
    # Every rank reads the files itself: evaluation sets are small.
    dataset = build_dataset(args.data, tokenizer, args.seq_length, packing=args.packing,
                            cache_dir=args.cache_dir)
    initialize(par)
    try:
        model, _ = checkpoint.load(args.ckpt, par, args.dtype, precision=precision,
                                   attention=args.attention)
        say(describe_frozen(model))
        loss, tokens = evaluate(model, dataset, args.micro_batch_size)
        say(f"eval: {dataset.stats.summary()}")
        say(json.dumps({"loss": loss, "tokens": tokens, "records": dataset.stats.samples}))
    finally:
        destroy()
    return 0
