"""`pesc eval --ckpt CKPT --data FILE ...`: mean loss over the loss tokens of a data file, for a
base or a training checkpoint, at any parallel layout. Run under torchrun for TP/PP/EP > 1.
The last stdout line is JSON: {"loss", "tokens", "records"}.

Records follow the training formats (data/formats.py): text records score every next-token
prediction (`ids = tokenizer(text).input_ids + [eos_id]`), the others their targets only.
"""
from __future__ import annotations

import argparse
import json
import os

from pesc_megatron.checkpoint import base as checkpoint
from pesc_megatron.checkpoint.format import TOKENIZER, read_info
from pesc_megatron.cli.args import add_parallel_args, add_precision_args, precision_from_args
from pesc_megatron.data import build_dataset, load_tokenizer
from pesc_megatron.model.attention import resolve_attention
from pesc_megatron.model.quantized import describe_frozen
from pesc_megatron.model.precision import check_fp8_machine, validate_precision
from pesc_megatron.parallel.config import ParallelConfig, splits_over_tp, validate_layout
from pesc_megatron.parallel.distributed import destroy, initialize, say
from pesc_megatron.schema import ConfigError
from pesc_megatron.train.config import ATTENTIONS
from pesc_megatron.train.evaluate import evaluate


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
    add_precision_args(ap)
    ap.add_argument("--base", help="where a training checkpoint's base checkpoint is, if it "
                    "moved (default: the path the run recorded)")
    ap.add_argument("--tokenizer", help="default: the checkpoint's tokenizer/ folder")
    ap.add_argument("--cache-dir", help="token cache (default: none, tokenise in memory)")
    ap.add_argument("--attention", choices=ATTENTIONS, default="auto",
                    help="core attention (as model.attention): auto, sdpa, local or te")
    add_parallel_args(ap)
    args = ap.parse_args(argv)
    par = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    if not splits_over_tp(par, args.seq_length):
        ap.error(f"--seq-length {args.seq_length} is not divisible by --tp {par.tp} (sequence "
                 "parallelism splits every sequence over the TP ranks)")
    precision = precision_from_args(args)
    try:
        validate_precision(precision, args.dtype)
    except ConfigError:  # the same check as precision.frozen_weights, in this command's flags
        ap.error(f"--frozen-weights {args.frozen_weights}: the base computes in --dtype "
                 f"{args.dtype}; use {args.dtype}, fp8 or nf4")
    check_fp8_machine(precision)
    resolve_attention(args.attention, "--attention")
    info = read_info(args.ckpt, args.base)
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
                                   base=args.base, attention=args.attention)
        say(describe_frozen(model))
        loss, tokens = evaluate(model, dataset, args.micro_batch_size)
        say(f"eval: {dataset.stats.summary()}")
        say(json.dumps({"loss": loss, "tokens": tokens, "records": dataset.stats.samples}))
    finally:
        destroy()
    return 0
