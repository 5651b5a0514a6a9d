"""Resident memory of a PESC checkpoint's frozen base in fp32, bf16, FP8 and NF4 (torchao,
weight storage only: `precision.frozen_weights=fp8|nf4`), each loaded in a fresh process at
TP=1.

    python tools/frozen_memory.py CKPT        # last line: JSON

Per variant: the frozen parameters' storage bytes (FP8: data + scales; NF4: data, double-
quantized scales, levels), and the process RSS after imports and after loading (their
difference is what the model took; peak = ru_maxrss over the whole load, which includes the
high-precision weights each low-precision one was converted from).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import subprocess
import sys
import time

# name: (model dtype, precision.frozen_weights, precision.quantize_output_layer,
#        precision.output_outliers, precision.linear_outliers); "bf16+fp8" and "bf16+nf4"
#        are the defaults
VARIANTS = {"fp32": ("fp32", None, True, 32, 16), "bf16": ("bf16", None, True, 32, 16),
            "fp8": ("fp32", "fp8", True, 32, 16), "bf16+fp8": ("bf16", "fp8", True, 32, 16),
            "bf16+fp8,no-outliers": ("bf16", "fp8", True, 0, 16),
            "bf16+fp8,output-kept": ("bf16", "fp8", False, 32, 16),
            "nf4": ("fp32", "nf4", True, 32, 16), "bf16+nf4": ("bf16", "nf4", True, 32, 16),
            "bf16+nf4,no-linear-outliers": ("bf16", "nf4", True, 32, 0),
            "bf16+nf4,output-kept": ("bf16", "nf4", False, 32, 16)}
LOW_BF16 = [v for v in VARIANTS if v.startswith(("bf16+fp8", "bf16+nf4"))]


def measure(ckpt: str, variant: str) -> dict:
    import psutil

    from pesc_megatron.checkpoint import base as checkpoint
    from pesc_megatron.model.quantized import frozen_weight_bytes
    from pesc_megatron.model.precision import PrecisionConfig
    from pesc_megatron.parallel.config import ParallelConfig
    from pesc_megatron.parallel.distributed import destroy, initialize

    dtype, frozen, output_layer, outliers, linear_outliers = VARIANTS[variant]
    initialize(ParallelConfig())
    gc.collect()
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    model, _ = checkpoint.load(ckpt, ParallelConfig(), dtype,
                               precision=PrecisionConfig(frozen_weights=frozen,
                                                         quantize_output_layer=output_layer,
                                                         output_outliers=outliers,
                                                         linear_outliers=linear_outliers))
    load_s = time.perf_counter() - start
    gc.collect()
    # glibc keeps freed memory (here: the weights before conversion) for reuse; give it back
    # so that RSS shows what the model holds.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    after = psutil.Process().memory_info().rss
    stats = frozen_weight_bytes(model)
    destroy()
    return dict(variant=variant, frozen_parameters=stats["parameters"],
                frozen_bytes=stats["bytes"], rss_before=before, rss_after=after,
                rss_model=after - before, load_s=round(load_s, 2), peak_rss=resource.getrusage(
                    resource.RUSAGE_SELF).ru_maxrss * 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--variant", choices=VARIANTS, help="measure one variant in this process")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(measure(args.ckpt, args.variant)))
        return
    rows = {}
    for variant in VARIANTS:  # fresh processes: freed memory is not always returned to the OS
        out = subprocess.run([sys.executable, __file__, args.ckpt, "--variant", variant],
                             check=True, capture_output=True, text=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    mib = 2**20
    print(f"{'variant':27} {'frozen MiB':>10} {'RSS model MiB':>13} {'peak RSS MiB':>12} "
          f"{'load s':>6}")
    for v, r in rows.items():
        print(f"{v:27} {r['frozen_bytes'] / mib:10.1f} {r['rss_model'] / mib:13.1f} "
              f"{r['peak_rss'] / mib:12.1f} {r['load_s']:6.1f}")
    bf16 = rows["bf16"]
    ratios = {f"{key}_{v}_over_bf16": rows[v][key] / bf16[key]
              for v in LOW_BF16 for key in ("frozen_bytes", "rss_model", "peak_rss")}
    print(json.dumps(dict(rows=rows, **{k: round(v, 4) for k, v in ratios.items()})))


if __name__ == "__main__":
    main()
