"""Step time around a checkpoint save, synchronous vs `train.async_save`: the quickstart job
(SmolLM2-135M crafted to 8 experts, EP=2 on 2 ranks, 8 x 256 packed tokens a step) saving
every other step, the two modes alternated. Per save: the time training waited for it
(`save_time_s`), and the step time of the step that ran while a background save was written
against the other steps. Prints a table; the last line is JSON (medians).

    python tools/save_time.py --base runs/bench/base [--rounds 2 --iters 7]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(base: str, out: Path, iters: int, async_save: bool) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "pesc_megatron.cli", "train", "examples/quickstart.yaml",
           f"model.checkpoint={base}", f"train.out_dir={out}", f"train.iters={iters}",
           "train.save_interval=2", "train.keep_last=100",
           f"train.async_save={'true' if async_save else 'false'}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True,
                   env=dict(os.environ, PYTHONWARNINGS="ignore"))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="runs/bench/base", help="a PESC checkpoint of SmolLM2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=7, help="saves after steps 2, 4, 6 (+ end)")
    ap.add_argument("--out", default="runs/bench/save_time")
    a = ap.parse_args()
    samples = {m: dict(wait=[], during=[], other=[]) for m in ("sync", "async")}
    for r in range(a.rounds):
        for mode in ("sync", "async"):
            rows = run(a.base, Path(a.out) / f"{mode}{r}", a.iters, mode == "async")
            by_step = {row["step"]: row for row in rows if "step_time_s" in row}
            for step, row in by_step.items():
                after_save = step > 1 and (step - 1) % 2 == 0 and step - 1 < a.iters
                if after_save:  # row `step` holds the save after step-1 and the next step
                    samples[mode]["wait"].append(row["save_time_s"])
                    samples[mode]["during"].append(row["step_time_s"])
                elif step > 1:  # step 1 warms up
                    samples[mode]["other"].append(row["step_time_s"])
    med = {m: {k: statistics.median(v) for k, v in s.items()} for m, s in samples.items()}
    for m, s in med.items():
        print(f"{m:5}: training waits {s['wait']:.3f} s per save; step time {s['during']:.2f} s "
              f"while a save is written, {s['other']:.2f} s otherwise")
    print(json.dumps(dict(bench="save_time", rounds=a.rounds, iters=a.iters, medians=med,
                          samples=samples)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
