"""Resident memory of a PESC checkpoint's frozen base in fp32, bf16 and FP8 (torchao, weight
storage only: `precision.frozen_weights=fp8`), each loaded in a fresh process at TP=1.

    python tools/fp8_memory.py CKPT        # last line: JSON

Per variant: the frozen parameters' storage bytes (FP8: data + scales), and the process RSS
after imports and after loading (their difference is what the model took; peak = ru_maxrss,
which for FP8 includes the high-precision weights it was converted from).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import subprocess
import sys

# name: (model dtype, precision.frozen_weights, precision.fp8_output_layer,
#        precision.fp8_output_outliers); "fp8" and "bf16+fp8" are the defaults
VARIANTS = {"fp32": ("fp32", None, True, 32), "bf16": ("bf16", None, True, 32),
            "fp8": ("fp32", "fp8", True, 32), "bf16+fp8": ("bf16", "fp8", True, 32),
            "bf16+fp8,no-outliers": ("bf16", "fp8", True, 0),
            "bf16+fp8,output-kept": ("bf16", "fp8", False, 32)}
FP8_BF16 = [v for v in VARIANTS if v.startswith("bf16+fp8")]


def measure(ckpt: str, variant: str) -> dict:
    import psutil

    from pesc_megatron.checkpoint import base as checkpoint
    from pesc_megatron.model.fp8 import frozen_weight_bytes
    from pesc_megatron.model.precision import PrecisionConfig
    from pesc_megatron.parallel.config import ParallelConfig
    from pesc_megatron.parallel.distributed import destroy, initialize

    dtype, frozen, output_layer, outliers = VARIANTS[variant]
    initialize(ParallelConfig())
    gc.collect()
    before = psutil.Process().memory_info().rss
    model, _ = checkpoint.load(ckpt, ParallelConfig(), dtype,
                               precision=PrecisionConfig(frozen_weights=frozen,
                                                         fp8_output_layer=output_layer,
                                                         fp8_output_outliers=outliers))
    gc.collect()
    # glibc keeps freed memory (here: the weights before conversion) for reuse; give it back
    # so that RSS shows what the model holds.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    after = psutil.Process().memory_info().rss
    stats = frozen_weight_bytes(model)
    destroy()
    return dict(variant=variant, frozen_parameters=stats["parameters"],
                frozen_bytes=stats["bytes"], rss_before=before, rss_after=after,
                rss_model=after - before, peak_rss=resource.getrusage(
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
    print(f"{'variant':20} {'frozen MiB':>10} {'RSS model MiB':>13} {'peak RSS MiB':>12}")
    for v, r in rows.items():
        print(f"{v:20} {r['frozen_bytes'] / mib:10.1f} {r['rss_model'] / mib:13.1f} "
              f"{r['peak_rss'] / mib:12.1f}")
    bf16 = rows["bf16"]
    ratios = {f"{key}_{v}_over_bf16": rows[v][key] / bf16[key]
              for v in FP8_BF16 for key in ("frozen_bytes", "rss_model")}
    print(json.dumps(dict(rows=rows, **{k: round(v, 4) for k, v in ratios.items()})))


if __name__ == "__main__":
    main()
