"""A run's metrics: rows in `metrics.jsonl` and the same scalars in TensorBoard (`tb/`),
written by rank 0; a resumed run first drops the rows a killed run wrote after its last
checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from pesc_megatron.analysis.balance import load_imbalance
from pesc_megatron.checkpoint import atomic
from pesc_megatron.parallel.distributed import is_rank0


class Logger:
    """Rank 0 writes metrics.jsonl and TensorBoard; every call is made on all ranks."""

    def __init__(self, out_dir: Path, start_step: int):
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if is_rank0():
            out_dir.mkdir(parents=True, exist_ok=True)
            if self.path.exists():  # drop rows a killed run wrote after its last checkpoint
                rows = [line for line in self.path.read_text().splitlines()
                        if _step_of(line) is not None and _step_of(line) <= start_step]
                atomic.write_text(self.path, "".join(r + "\n" for r in rows))
            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1)

    def write(self, row: dict, layer_load: torch.Tensor | None = None) -> None:
        """Appends `row`; `layer_load` ([layers, experts] tokens routed in the interval, as
        counts or shares) adds each layer's per-expert shares as `expert_load`."""
        if not is_rank0():
            return
        shares = None
        if layer_load is not None:
            total = layer_load.double().sum(dim=1, keepdim=True)
            shares = layer_load.double() / total.clamp(min=1e-30)  # a layer routing none: 0s
            # 6 digits tell collapse from balance and keep a 60-layer, 8-expert row near 5 kB
            row = dict(row, expert_load=[[round(share, 6) for share in layer]
                                         for layer in shares.tolist()])
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is None:
            return
        step = row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(f"train/{key}" if "valid" not in key else key, value, step)
        if shares is not None:
            imbalance = load_imbalance(shares).tolist()
            for layer, load in enumerate(shares.tolist(), start=1):
                for e, share in enumerate(load):
                    self.tb.add_scalar(f"expert_load/layer_{layer:02d}/expert_{e}", share, step)
                self.tb.add_scalar(f"expert_imbalance/layer_{layer:02d}", imbalance[layer - 1],
                                   step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str):
    """The step of a metrics.jsonl row, None for a torn line (a kill during a write)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
