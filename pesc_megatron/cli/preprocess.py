"""`pesc preprocess --input DATA --tokenizer T --output STORE`: tokenises one data source into a
token store (data/store.py) offline, in `--workers` processes, as Megatron-LM's
`tools/preprocess_data.py` does for pretraining. `pesc train` takes the store as a data entry
(`data.train: [{path: STORE, weight: 1}]`) with the same tokenizer, chat template and
`data.loss_on`, and reads it in place: nothing is tokenised at the start of the run.
The last line is a JSON summary (records, samples, tokens, skipped, seconds, records_per_s)."""
from __future__ import annotations

import argparse
import json
import time

from pesc_megatron.data import LOSS_ON, load_tokenizer, parse_entry, write_store
from pesc_megatron.schema import UserError


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pesc preprocess", description=__doc__.split("\n")[0])
    ap.add_argument("--input", required=True, help="JSONL/JSON file, .parquet, .arrow or a "
                    "datasets save_to_disk folder")
    ap.add_argument("--tokenizer", required=True,
                    help="HF tokenizer folder, sentencepiece .model, or a checkpoint folder")
    ap.add_argument("--output", required=True, help="the store folder (replaced when done)")
    ap.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1)")
    ap.add_argument("--on-error", choices=["raise", "skip"], default="raise")
    ap.add_argument("--loss-on", choices=LOSS_ON, default="assistant",
                    help="which turns are targets (data.loss_on)")
    ap.add_argument("--chat-template", help="a Jinja file replacing the tokenizer's template")
    ap.add_argument("--columns", default="",
                    help="field=column,... : read column as field (e.g. messages=dialog)")
    ap.add_argument("--split", help="the split of a DatasetDict folder (default train)")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    columns = {}
    for pair in filter(None, args.columns.split(",")):
        field, sep, column = pair.partition("=")
        if not sep or not field or not column:
            raise UserError(f"--columns: {pair!r} is not field=column")
        columns[field.strip()] = column.strip()
    entry = {"path": args.input, "columns": columns}
    if args.split:
        entry["split"] = args.split
    src = parse_entry(entry, "--input")
    if src.kind == "store":
        raise UserError(f"--input {args.input}: already a token store")
    tok = load_tokenizer(args.tokenizer, args.chat_template)
    start = time.perf_counter()
    store = write_store(args.output, src, tok, args.loss_on, args.on_error, args.workers)
    seconds = time.perf_counter() - start
    meta = store.meta
    summary = {k: meta[k] for k in ("records", "samples", "tokens", "empty_target", "skipped")}
    summary.update(seconds=round(seconds, 2), records_per_s=round(meta["records"] / seconds, 1),
                   workers=args.workers, output=args.output)
    print(json.dumps(summary))
    return 0
