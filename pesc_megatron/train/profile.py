"""`train.profile_step`: one training step under `torch.profiler`, as Megatron-LM's
`--profile` does. Every rank writes, under `train.out_dir/profile/`, a chrome trace with input
shapes (`step<N>_rank<r>.json`, for chrome://tracing or Perfetto) and a table of the top ops
by self time (`step<N>_rank<r>.txt`), headed by the step's wall time and the part of it no op
accounts for (Python, the schedule's bookkeeping). The profiled step runs slower."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import torch.distributed as dist


@contextlib.contextmanager
def profiled(out_dir: Path, step: int, enabled: bool, row_limit: int = 30):
    if not enabled:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        t0 = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    folder = Path(out_dir) / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step{step}_rank{dist.get_rank() if dist.is_initialized() else 0}"
    prof.export_chrome_trace(str(folder / f"{name}.json"))
    averages = prof.key_averages()
    ops = sum(e.self_cpu_time_total for e in averages) / 1e6
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    (folder / f"{name}.txt").write_text(
        f"step {step}: wall {wall:.3f} s, ops' self CPU time {ops:.3f} s, outside any op "
        f"{max(wall - ops, 0.0):.3f} s\n" + averages.table(sort_by=sort, row_limit=row_limit))
