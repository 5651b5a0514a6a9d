"""`pesc eval --ckpt CKPT --data FILE ...`: mean loss over the loss tokens of a data file, for a
base or a training checkpoint (or run folder), at any parallel layout. Run under torchrun for
TP/PP/EP > 1. The last stdout line is JSON: {"loss", "tokens", "records"}.

Records follow the training formats (data/formats.py): text records score every next-token
prediction (`ids = tokenizer(text).input_ids + [eos_id]`), the others their targets only.

`pesc eval --ckpt CKPT --tasks T1,T2 ...`: lm-evaluation-harness tasks (names, or task YAML
files such as examples/eval/*.yaml) on the megatron-core model at the same layouts, answered as
lm-eval's Hugging Face model answers them on an export (pip install -e '.[eval]'). Rank 0
prints lm-eval's table; the last stdout line is JSON {"results": {task: {metric: value}},
"requests": {request type: {"requests", "seconds"}}}.
"""
from __future__ import annotations

import argparse
import json
import os

from pesc_megatron.checkpoint import base as checkpoint
from pesc_megatron.checkpoint.format import TOKENIZER, read_info
from pesc_megatron.cli.args import add_parallel_args, add_precision_args, precision_from_args
from pesc_megatron.data import LOSS_ON, build_dataset, load_tokenizer
from pesc_megatron.model.attention import resolve_attention
from pesc_megatron.model.quantized import describe_frozen
from pesc_megatron.model.precision import check_fp8_machine, validate_precision
from pesc_megatron.parallel.config import ParallelConfig, splits_over_tp, validate_layout
from pesc_megatron.parallel.distributed import destroy, initialize, is_rank0, say
from pesc_megatron.schema import ConfigError
from pesc_megatron.train.config import ATTENTIONS
from pesc_megatron.train.evaluate import evaluate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pesc eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="base or training checkpoint (or run folder)")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", nargs="+", help="data files (JSONL/JSON, Parquet, Arrow, datasets "
                      "folders, token stores): their mean loss")
    what.add_argument("--tasks", help="comma-separated lm-eval task names or task YAML files")
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
    ap.add_argument("--loss-on", choices=LOSS_ON, default="assistant",
                    help="with --data: which turns are scored (data.loss_on)")
    ap.add_argument("--chat-template", help="a Jinja file replacing the tokenizer's template")
    ap.add_argument("--attention", choices=ATTENTIONS, default="auto",
                    help="core attention (as model.attention): auto, sdpa, local or te")
    add_parallel_args(ap)
    tasks = ap.add_argument_group("lm-eval tasks (with --tasks)")
    tasks.add_argument("--include-path", action="append", default=[],
                       help="a folder of task YAML files (repeatable)")
    tasks.add_argument("--num-fewshot", type=int, help="default: each task's own")
    tasks.add_argument("--limit", type=float,
                       help="at most this many documents per task (a fraction if below 1)")
    tasks.add_argument("--batch-size", type=int, default=8,
                       help="sequences per forward call on each data-parallel replica")
    tasks.add_argument("--max-length", type=int,
                       help="context window (default: the model's maximum position, as lm-eval)")
    tasks.add_argument("--apply-chat-template", action="store_true",
                       help="render each request with the tokenizer's chat template")
    tasks.add_argument("--confirm-run-unsafe-code", action="store_true",
                       help="let code tasks (humaneval, mbpp) execute the model's code")
    tasks.add_argument("--output", help="write lm-eval's results JSON here (rank 0)")
    tasks.add_argument("--log-samples", action="store_true",
                       help="with --output: per-sample logs beside it, one JSONL per task")
    args = ap.parse_args(argv)
    if args.tasks is not None:
        return eval_tasks(ap, args)
    par = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    if not splits_over_tp(par, args.seq_length):
        ap.error(f"--seq-length {args.seq_length} is not divisible by --tp {par.tp} (sequence "
                 "parallelism splits every sequence over the TP ranks)")
    precision, info = checked_setup(ap, args, par)
    tokenizer = load_tokenizer(args.tokenizer or info.base / TOKENIZER, args.chat_template)
    # Every rank reads the files itself: evaluation sets are small.
    dataset = build_dataset(args.data, tokenizer, args.seq_length, packing=args.packing,
                            cache_dir=args.cache_dir, loss_on=args.loss_on)
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


def checked_setup(ap, args, par: ParallelConfig):
    """(precision, checkpoint info) after the checks both modes share, before any rank
    starts work: the flags, the machine, and the checkpoint against the layout."""
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
    return precision, info


def eval_tasks(ap, args) -> int:
    """`pesc eval --tasks`: lm-eval on the megatron-core model (harness/)."""
    from pesc_megatron.harness.tasks import require_lm_eval

    require_lm_eval()
    from pesc_megatron.harness.forward import Forward
    from pesc_megatron.harness.lm import PESCLM
    from pesc_megatron.harness.tasks import run_tasks, task_manager, tokenizer_for_tasks, \
        write_results

    if args.log_samples and not args.output:
        ap.error("--log-samples needs --output")
    manager, names = task_manager([t for t in args.tasks.split(",") if t], args.include_path)
    par = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    precision, info = checked_setup(ap, args, par)
    tokenizer, stop_ids = tokenizer_for_tasks(args.tokenizer or info.base / TOKENIZER)
    max_length = args.max_length or info.model.max_position_embeddings
    initialize(par)
    try:
        model, _ = checkpoint.load(args.ckpt, par, args.dtype, precision=precision,
                                   base=args.base, attention=args.attention)
        say(describe_frozen(model))
        lm = PESCLM(Forward(model, args.batch_size), tokenizer,
                    max_length, stop_ids)
        results = run_tasks(lm, manager, names, args.num_fewshot, args.limit,
                            args.log_samples, args.apply_chat_template,
                            args.confirm_run_unsafe_code)
        if is_rank0():
            from lm_eval.utils import make_table

            print(make_table(results))
            if args.output:
                write_results(results, args.output, args.log_samples)
            scores = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                      for task, metrics in results["results"].items()}
            for kind, t in lm.timings.items():
                print(f"{kind}: {t['requests']} requests in {t['seconds']:.2f} s")
            print(json.dumps({"results": scores, "requests": lm.timings}), flush=True)
    finally:
        destroy()
    return 0
