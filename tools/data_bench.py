"""Benchmarks of the data side (docs/data.md); each prints JSON, its summary on the last line.

    # tokenisation records/s with 1 and 2 workers, interleaved (`pesc preprocess`)
    python tools/data_bench.py tokenize --data runs/data/synthetic-100k.jsonl --tokenizer T
    # per-rank memory of the data side with 2 ranks on one node (torchrun, gloo)
    python tools/data_bench.py rss --data runs/data/synthetic-1m.jsonl --tokenizer T \\
        --cache-dir runs/data/cache
    # time to the first training step of `pesc train CONFIG`, cold then warm cache
    python tools/data_bench.py first-step --config examples/quickstart.yaml \\
        --data runs/data/synthetic-1m.jsonl --cache-dir runs/data/cache-fs

`rss` builds the training data as `pesc train` does (rank 0 tokenises, or reads the cache; the
others read the cache), then reads `--batches` global batches of this rank's micro-batches, and
reports each rank's RSS, PSS and USS (psutil) and RssAnon/RssFile (/proc) before the data,
after building it and after reading: the data side is the difference.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_tokenize(args) -> dict:
    runs = {1: [], 2: []}
    for _ in range(args.rounds):
        for workers in (1, 2):
            out = Path(tempfile.mkdtemp(dir=args.tmp)) / "store"
            cmd = [sys.executable, "-m", "pesc_megatron.cli", "preprocess", "--input",
                   args.data, "--tokenizer", args.tokenizer, "--output", str(out),
                   "--workers", str(workers)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            runs[workers].append(row["records_per_s"])
            shutil.rmtree(out.parent)
    one, two = statistics.median(runs[1]), statistics.median(runs[2])
    return {"bench": "tokenize", "data": args.data, "rounds": args.rounds,
            "records_per_s_1_worker": one, "records_per_s_2_workers": two,
            "speedup": round(two / one, 3), "cpus": os.cpu_count()}


def rss_worker(args) -> None:
    import psutil
    import torch.distributed as dist

    from pesc_megatron.data import collate, load_tokenizer
    from pesc_megatron.train.batches import GlobalBatches, build_data
    from pesc_megatron.train.config import DataConfig, JobConfig, TrainConfig

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    proc = psutil.Process()

    def mem() -> dict:
        m = proc.memory_full_info()
        out = {k: round(getattr(m, k) / 2 ** 20, 1) for k in ("rss", "pss", "uss")}
        for line in Path("/proc/self/status").read_text().splitlines():  # RSS by kind
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0].lower()] = round(int(line.split()[1]) / 1024, 1)
        return out

    tok = load_tokenizer(args.tokenizer)
    job = JobConfig(data=DataConfig(train=[args.data], seq_length=args.seq_length,
                                    num_workers=args.workers),
                    train=TrainConfig(global_batch_size=args.gbs))
    before = mem()
    t0 = time.perf_counter()
    ds = build_data(job.data.train, tok, job, Path(args.cache_dir), True)
    built, seconds = mem(), time.perf_counter() - t0
    batches = GlobalBatches(ds, args.gbs, 0)
    for step in range(args.batches):
        idx = batches.indices(step)
        mine = idx[rank * len(idx) // world:(rank + 1) * len(idx) // world]
        collate([ds[i] for i in mine])
    read = mem()
    rows = [None] * world
    dist.all_gather_object(rows, {"rank": rank, "before": before, "built": built,
                                  "read": read, "build_s": round(seconds, 2)})
    if rank == 0:
        print(json.dumps({"sequences": len(ds), "records": ds.stats.records, "ranks": rows}))
    dist.destroy_process_group()


def run_rss(args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.nproc}", __file__, "_rss_worker", "--data", args.data,
           "--tokenizer", args.tokenizer, "--cache-dir", args.cache_dir, "--batches",
           str(args.batches), "--seq-length", str(args.seq_length), "--gbs", str(args.gbs),
           "--workers", str(args.workers)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    if res.returncode:
        raise SystemExit(res.stdout[-2000:] + res.stderr[-3000:])
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["data_side_mib"] = [{k: round(r["read"][k] - r["before"][k], 1) for k in r["read"]}
                            for r in out["ranks"]]
    out.update(bench="rss", data=args.data, batches=args.batches)
    return out


def run_first_step(args) -> dict:
    """`pesc train CONFIG` with the data replaced, until its first step's log line."""
    rows = {}
    for cache in args.caches.split(","):
        if cache == "cold":
            shutil.rmtree(args.cache_dir, ignore_errors=True)
        out = Path(tempfile.mkdtemp(dir=args.tmp))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc}", "-m", "pesc_megatron.cli", "train",
               args.config, f"data.train=[{args.data}]", f"data.cache_dir={args.cache_dir}",
               f"data.num_workers={args.workers}", f"train.out_dir={out}", "train.iters=1",
               "train.log_interval=1", *args.overrides]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        first = data_at = None
        for line in proc.stdout:
            if data_at is None and line.startswith("data: train"):
                data_at = time.perf_counter() - start
            if first is None and line.startswith("step 1"):
                first = time.perf_counter() - start
        if proc.wait() or first is None:
            raise SystemExit(f"pesc train failed ({cache} cache): rc {proc.returncode}")
        rows[cache] = {"first_step_s": round(first, 1), "data_ready_s": round(data_at, 1)}
        print(json.dumps({cache: rows[cache]}), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return {"bench": "first-step", "data": args.data, "config": args.config, **rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="bench", required=True)
    for name in ("tokenize", "rss", "_rss_worker", "first-step"):
        p = sub.add_parser(name)
        p.add_argument("--data", required=True)
        p.add_argument("--tmp", default=None, help="where temporary stores go")
        p.add_argument("--workers", type=int, default=2)
        if name != "first-step":
            p.add_argument("--tokenizer", required=True)
        if name == "tokenize":
            p.add_argument("--rounds", type=int, default=1)
        if name in ("rss", "_rss_worker", "first-step"):
            p.add_argument("--cache-dir", required=True)
            p.add_argument("--nproc", type=int, default=2)
        if name in ("rss", "_rss_worker"):
            p.add_argument("--batches", type=int, default=100)
            p.add_argument("--seq-length", type=int, default=2048)
            p.add_argument("--gbs", type=int, default=32)
        if name == "first-step":
            p.add_argument("--config", required=True)
            p.add_argument("--caches", default="cold,warm",
                           help="cold (the cache folder is deleted first) and/or warm")
            p.add_argument("overrides", nargs="*", help="more key=value for pesc train")
    args = ap.parse_args()
    if args.bench == "_rss_worker":
        return rss_worker(args)
    run = {"tokenize": run_tokenize, "rss": run_rss, "first-step": run_first_step}[args.bench]
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
