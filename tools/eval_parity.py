"""`pesc eval --tasks` at several layouts against lm-eval's Hugging Face model on the export, and
its TP=1 run against a hand-written loop over the same requests (docs/eval.md):

    python tools/eval_parity.py --ckpt runs/quickstart/train --export runs/quickstart/hf \\
        --layouts tp1,ep2,tp3 --limit 10

For every request of every task it compares the per-sample results lm-eval logged: the
log-likelihoods (|a - b| <= 1e-4 * max(|b|, 1)), the greedy flags, the generations; then the
task scores. The hand-written loop uses only transformers: the export's forward pass on each
request alone, with lm-eval's documented context/continuation split, and greedy decoding
without a cache. The last stdout line is JSON: the largest differences, the mismatches (which
must be none), and each run's seconds per 100 requests of each type (with --rounds N, each run
N times interleaved, and the medians: the machines are shared and noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = [str(ROOT / "examples" / "eval" / f"{t}.yaml") for t in ("pesc_mc", "pesc_gen",
                                                                  "pesc_text")]
RTOL = 1e-4


def layout_flags(layout: str) -> tuple[list[str], int]:
    """'tp3' / 'ep2' / 'tp2ep2' / 'tp1' -> (pesc flags, ranks)."""
    parts = dict((k, int(v)) for k, v in re.findall(r"(tp|pp|ep|etp)(\d+)", layout))
    if not parts or "".join(f"{k}{v}" for k, v in parts.items()) != layout:
        raise SystemExit(f"--layouts: cannot read {layout!r} (e.g. tp1, ep2, tp3, tp2ep2)")
    tp, pp, ep = parts.get("tp", 1), parts.get("pp", 1), parts.get("ep", 1)
    etp = parts.get("etp", 1)  # adapter experts unsplit unless asked (adapter dims are small)
    flags = ["--tp", str(tp), "--pp", str(pp), "--ep", str(ep), "--etp", str(etp)]
    return flags, max(tp * pp, ep * etp * pp)


def read_samples(files: list[Path]) -> dict[str, list[dict]]:
    """task -> its logged samples, by doc_id."""
    return {f.stem.removeprefix("results_"): sorted(
        (json.loads(line) for line in open(f)), key=lambda r: r["doc_id"]) for f in files}


def run_pesc(ckpt: str, layout: str, limit: int, batch_size: int, work: Path):
    flags, ranks = layout_flags(layout)
    out = work / layout / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(ranks), "-m", "pesc_megatron.cli", "eval", "--ckpt", ckpt, "--tasks",
           ",".join(TASKS), "--limit", str(limit), "--batch-size", str(batch_size), "--output",
           str(out), "--log-samples", *flags]
    # torchrun would give each rank one thread; share the cores as the in-process HF run has them
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        raise SystemExit(f"pesc eval at {layout} failed:\n{proc.stderr[-3000:]}")
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    return read_samples(sorted(out.parent.glob("results_pesc_*.jsonl"))), last


def run_hf(export: str, limit: int, batch_size: int):
    """lm-eval's HF model on the export, in this process, timing its request calls."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=export, trust_remote_code=True, dtype="float32",
              batch_size=batch_size, device="cpu")
    timings = {}
    for kind in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(lm, kind)

        def timed(requests, *a, _method=method, _kind=kind, **k):
            start = time.perf_counter()
            res = _method(requests, *a, **k)
            t = timings.setdefault(_kind, {"requests": 0, "seconds": 0.0})
            t["requests"] += len(requests)
            t["seconds"] += time.perf_counter() - start
            return res
        setattr(lm, kind, timed)
    manager = TaskManager(include_path=str(ROOT / "examples" / "eval"), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=["pesc_mc", "pesc_gen", "pesc_text"],
                                      limit=limit, log_samples=True, task_manager=manager)
    # as logged to a file (tuples become lists), like pesc eval's samples
    samples = json.loads(json.dumps(results["samples"], default=str))
    return samples, results["results"], timings


def hand_loop(export: str, samples: dict[str, list[dict]]) -> dict[str, list]:
    """Each logged request answered by the export alone, one request per forward pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    gen_config = json.loads((Path(export) / "generation_config.json").read_text())
    stop_ids = {tok.eos_token_id, *([gen_config["eos_token_id"]]
                                    if isinstance(gen_config.get("eos_token_id"), int)
                                    else gen_config.get("eos_token_id") or [])}
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @torch.no_grad()
    def logprobs(inp: list[int], targets: list[int]) -> tuple[float, bool]:
        logits = model(torch.tensor([inp])).logits[0, -len(targets):].float()
        logp = torch.log_softmax(logits, -1)
        picked = logp[torch.arange(len(targets)), torch.tensor(targets)]
        return picked.sum().item(), logits.argmax(-1).tolist() == targets

    def loglikelihood(context: str, continuation: str):
        spaces = len(context) - len(context.rstrip())  # lm-eval moves them to the continuation
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = tok.encode(context)
        cont = tok.encode(context + continuation)[len(ctx):]
        return logprobs((ctx + cont)[:-1], cont)

    @torch.no_grad()
    def generate(context: str, kwargs: dict) -> str:
        ids, new = tok.encode(context), []
        until = [s for s in kwargs.get("until", []) + [tok.decode(tok.eos_token_id)] if s]
        for _ in range(kwargs.get("max_gen_toks", 256)):
            token = model(torch.tensor([ids + new])).logits[0, -1].argmax().item()
            if token in stop_ids:
                break
            new.append(token)
            if any(s in tok.decode(new, skip_special_tokens=True) for s in until):
                break
        text = tok.decode(new, skip_special_tokens=True)
        for s in until:
            text = text.split(s)[0]
        return text

    out = {}
    for task, rows in samples.items():
        answers = []
        for row in rows:
            for args in row["arguments"]:
                if isinstance(args[-1], dict):
                    answers.append(generate(args[0], args[1]))
                elif len(args) == 2:
                    answers.append(list(loglikelihood(args[0], args[1])))
                else:
                    ids = tok.encode(args[0])
                    answers.append(logprobs([prefix] + ids[:-1], ids)[0])
        out[task] = answers
    return out


def flat(samples: dict[str, list[dict]]) -> dict[str, list]:
    """task -> every request's response, in doc and argument order."""
    return {task: [r[0] for row in rows for r in row["resps"]] for task, rows in samples.items()}


def compare(a: dict[str, list], b: dict[str, list]) -> dict:
    """Largest log-likelihood difference (relative, as RTOL) and the mismatches of a vs b."""
    worst, mismatches = 0.0, []
    for task in b:
        if task not in a or len(a[task]) != len(b[task]):
            mismatches.append(f"{task}: {len(a.get(task, []))} vs {len(b[task])} requests")
            continue
        for i, (x, y) in enumerate(zip(a[task], b[task])):
            if isinstance(y, str):
                if x != y:
                    mismatches.append(f"{task}[{i}]: generation {x!r} vs {y!r}")
                continue
            xs, ys = (x, y) if isinstance(y, list) else ([x], [y])
            diff = abs(xs[0] - ys[0]) / max(abs(ys[0]), 1.0)
            worst = max(worst, diff)
            if diff > RTOL:
                mismatches.append(f"{task}[{i}]: log-likelihood {xs[0]} vs {ys[0]}")
            if len(ys) > 1 and bool(xs[1]) != bool(ys[1]):
                mismatches.append(f"{task}[{i}]: greedy {xs[1]} vs {ys[1]}")
    return {"max_rel_diff": worst, "mismatches": mismatches}


def score_mismatches(a: dict, b: dict) -> list[str]:
    """Task scores of results a vs b: accuracies exactly, perplexities to RTOL."""
    out = []
    for task, metrics in b.items():
        for k, y in metrics.items():
            if not isinstance(y, float) or "stderr" in k:
                continue
            x = a.get(task, {}).get(k)
            if x is None or abs(x - y) > RTOL * max(abs(y), 1.0) * (0 if "acc" in k
                                                                   or "exact" in k else 1):
                out.append(f"{task} {k}: {x} vs {y}")
    return out


def per_100(timings: list[dict]) -> dict:
    """Seconds per 100 requests of each type: the median over rounds."""
    return {k: round(statistics.median(100 * t[k]["seconds"] / max(t[k]["requests"], 1)
                                       for t in timings), 3) for k in timings[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="PESC base or training checkpoint")
    ap.add_argument("--export", required=True, help="its Hugging Face export")
    ap.add_argument("--layouts", default="tp1,ep2,tp3", help="comma-separated, e.g. tp1,ep2")
    ap.add_argument("--limit", type=int, default=10, help="documents per task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run everything this many times, interleaved (timings: medians)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    layouts = args.layouts.split(",")
    timings = {name: [] for name in ["lm-eval hf"] + [f"pesc {lay}" for lay in layouts]}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            hf_samples, hf_results, hf_timings = run_hf(args.export, args.limit,
                                                        args.batch_size)
            timings["lm-eval hf"].append(hf_timings)
            reference = flat(hf_samples)
            for layout in layouts:
                samples, last = run_pesc(args.ckpt, layout, args.limit, args.batch_size,
                                         Path(tmp))
                timings[f"pesc {layout}"].append(last["requests"])
                row = compare(flat(samples), reference)
                row["mismatches"] += score_mismatches(last["results"], hf_results)
                old = rows.get(f"pesc {layout}")
                if old is not None:  # keep the worst round
                    row["mismatches"] += old["mismatches"]
                    row["max_rel_diff"] = max(row["max_rel_diff"], old["max_rel_diff"])
                rows[f"pesc {layout}"] = dict(row, scores=last["results"])
                if layout == "tp1":
                    pesc_tp1 = flat(samples)
        if "tp1" in layouts:
            rows["pesc tp1 vs hand loop"] = compare(pesc_tp1, hand_loop(args.export, hf_samples))
    report = {"runs": {"lm-eval hf": {}, **rows}, "limit": args.limit, "rounds": args.rounds,
              "hf_scores": {t: {k: v for k, v in m.items() if isinstance(v, float)}
                            for t, m in hf_results.items()},
              "requests": {task: len(v) for task, v in reference.items()}}
    for name, ts in timings.items():
        report["runs"][name]["per_100_s"] = per_100(ts)
    report["ok"] = all(not r.get("mismatches") for r in report["runs"].values())
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
