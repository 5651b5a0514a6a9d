"""A synthetic instruction set at the paper's scale, for the data benchmarks (docs/data.md).

    python tools/make_synthetic_data.py --records 1000000 --out runs/data/synthetic

writes `{out}.jsonl` (ShareGPT: `conversations: [{from, value}]`, an optional `system`) and,
with `--parquet`, `{out}.parquet` holding the same records. Records have 1-3 human/gpt turns
of words drawn (seeded) from Python's own docstrings: about SlimOrca's length and shape. The
text is nonsense; only its size and layout matter to tokenisation, storage and loading.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

BATCH = 20_000  # records generated and written at a time


def words() -> list[str]:
    """English words (and their frequencies) from the docstrings of a few standard modules, so
    that tokenizers see text about as compressible as real instructions."""
    import argparse as a, collections as c, json as j, pathlib as p, textwrap as t  # noqa

    text = " ".join(str(getattr(obj, "__doc__", "") or "") for mod in (a, c, j, p, t)
                    for obj in [mod] + [getattr(mod, n) for n in dir(mod)])
    return [w for w in text.replace("\n", " ").split(" ") if w.isalpha()]


def records(rng: np.random.Generator, vocab: list[str], n: int) -> list[dict]:
    vocab_arr = np.array(vocab)

    def text(lo: int, hi: int) -> str:
        return " ".join(vocab_arr[rng.integers(0, len(vocab), int(rng.integers(lo, hi)))])

    out = []
    for _ in range(n):
        rec = {"system": text(5, 20) if rng.random() < 0.5 else ""}
        turns = []
        for _ in range(int(rng.integers(1, 4))):
            turns += [{"from": "human", "value": text(10, 60)},
                      {"from": "gpt", "value": text(20, 120)}]
        rec["conversations"] = turns
        out.append(rec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--out", required=True, help="path prefix: writes OUT.jsonl (OUT.parquet)")
    ap.add_argument("--parquet", action="store_true", help="also write OUT.parquet")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    vocab = words()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    with open(out.with_suffix(".jsonl"), "w") as f:
        for start in range(0, args.records, BATCH):
            batch = records(rng, vocab, min(BATCH, args.records - start))
            f.write("".join(json.dumps(r) + "\n" for r in batch))
            if args.parquet:
                import pyarrow as pa
                import pyarrow.parquet as pq

                table = pa.Table.from_pylist(batch)
                if writer is None:
                    writer = pq.ParquetWriter(out.with_suffix(".parquet"), table.schema)
                writer.write_table(table)
    if writer is not None:
        writer.close()
    print(json.dumps({"records": args.records, "jsonl": str(out.with_suffix(".jsonl")),
                      "parquet": str(out.with_suffix(".parquet")) if args.parquet else None}))


if __name__ == "__main__":
    main()
