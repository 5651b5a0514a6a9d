"""`pesc report RUN_DIR [--out DIR]`: PNG plots of a `pesc train` run from its metrics.jsonl.

- loss.png: loss, LM loss and validation loss; the load-balancing loss; lr and grad norm.
- expert_load.png: one heatmap per layer of each expert's share of the layer's routed tokens
  over the steps; white is the balanced share 1/E, red busier, blue idler, so a collapse onto
  one expert stands out.
- imbalance.png: the busiest expert's share over the mean share (1 = balanced, E = every token
  on one expert), layers x steps.

Written to RUN_DIR/report/ unless --out. The last stdout line is JSON; its `max_share` is the
busiest expert's share in any layer over the last logged interval (`max_share_layer`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pesc_megatron.analysis.balance import load_imbalance
from pesc_megatron.analysis.report import (
    METRICS,
    draw_expert_load,
    draw_imbalance,
    draw_loss,
    load_matrix,
    read_metrics,
    step_edges,
)
from pesc_megatron.schema import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pesc report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a `pesc train` output folder (holding metrics.jsonl)")
    ap.add_argument("--out", help="folder for the PNG files (default: RUN_DIR/report)")
    args = ap.parse_args(argv)

    train, valid = read_metrics(args.run_dir)
    out = Path(args.out) if args.out else Path(args.run_dir) / "report"
    loaded = [row for row in train if "expert_load" in row]
    edges = step_edges(train, loaded) if loaded else None
    summary = dict(loss_png=None, expert_load_png=None, imbalance_png=None,
                   steps=train[-1]["step"], layers=None, experts=None,
                   final_loss=train[-1]["loss"],
                   final_valid_loss=valid[-1]["valid_loss"] if valid else None,
                   max_share=None, max_share_layer=None)
    try:
        out.mkdir(parents=True, exist_ok=True)
        summary["loss_png"] = str(draw_loss(train, valid, out / "loss.png"))
        if loaded:
            matrix = load_matrix(loaded)
            layers, experts, _ = matrix.shape
            summary["expert_load_png"] = str(draw_expert_load(matrix, edges,
                                                              out / "expert_load.png"))
            summary["imbalance_png"] = str(draw_imbalance(load_imbalance(matrix), edges, experts,
                                                          out / "imbalance.png"))
            last = matrix[:, :, -1]
            summary.update(layers=layers, experts=experts, max_share=float(last.max()),
                           max_share_layer=int(last.max(axis=1).argmax()) + 1)
    except OSError as e:
        raise ConfigError(f"{out}: cannot write the report ({e})") from None

    metrics = Path(args.run_dir) / METRICS
    for key in ("loss_png", "expert_load_png", "imbalance_png"):
        if summary[key]:
            print(f"wrote {summary[key]}")
    if not loaded:
        print(f"{metrics}: no training row has expert_load (logged before per-layer loads "
              "were recorded): expert_load.png and imbalance.png not drawn")
    elif len(loaded) < len(train):
        print(f"{metrics}: {len(train) - len(loaded)} of {len(train)} training rows have no "
              f"expert_load (logged before per-layer loads were recorded): the heatmaps start "
              f"after step {edges[0]:.0f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
