"""PNG plots of a `pesc train` run from its metrics.jsonl (`pesc report`, cli/report.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

from pesc_megatron.checkpoint.atomic import atomic_path
from pesc_megatron.schema import ConfigError

METRICS = "metrics.jsonl"


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------
def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows) of a run folder's metrics.jsonl, checked: steps in
    order, every `expert_load` a [layers][experts] list of numbers of one shape."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such folder")
    path = run_dir / METRICS
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {METRICS} in it (not a `pesc train` output folder)")
    train, valid, shape = [], [], None
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: invalid JSON ({e})") from None
        if not isinstance(row, dict) or not _is_number(row.get("step")):
            raise ConfigError(f"{where}: not a metrics row (no numeric step)")
        if _is_number(row.get("valid_loss")):
            valid.append(row)
        if "loss" not in row:  # validation rows and any other kind
            continue
        if not _is_number(row["loss"]):
            raise ConfigError(f"{where}: loss={row['loss']!r} is not a number")
        if train and row["step"] <= train[-1]["step"]:
            raise ConfigError(f"{where}: step {row['step']} after step {train[-1]['step']} "
                              "(rows out of order)")
        if "expert_load" in row:
            try:
                load = np.asarray(row["expert_load"], dtype=float)
            except (TypeError, ValueError):
                load = None
            if load is None or load.ndim != 2 or load.size == 0:
                raise ConfigError(f"{where}: expert_load is not a [layers][experts] list of "
                                  "numbers")
            if shape is not None and load.shape != shape:
                raise ConfigError(f"{where}: expert_load is {load.shape[0]} layers x "
                                  f"{load.shape[1]} experts, earlier rows {shape[0]} x "
                                  f"{shape[1]}")
            shape = load.shape
        train.append(row)
    if not train:
        raise ConfigError(f"{path}: no training rows (the run stopped before its first log "
                          "interval?)")
    return train, valid


def load_matrix(rows: list[dict]) -> np.ndarray:
    """[layers, experts, rows]: each expert's share of its layer's routed tokens."""
    return np.array([row["expert_load"] for row in rows], dtype=float).transpose(1, 2, 0)


def step_edges(train: list[dict], rows: list[dict]) -> np.ndarray:
    """Cell edges on the step axis: a row averages the steps after the previous logged row."""
    first = rows[0]["step"]
    before = [row["step"] for row in train if row["step"] < first]
    return np.array([before[-1] if before else 0] + [row["step"] for row in rows], dtype=float)


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    """Steps and values of the rows that have a number under `key` (older runs lack some)."""
    pairs = [(row["step"], row[key]) for row in rows if _is_number(row.get(key))]
    return [s for s, _ in pairs], [v for _, v in pairs]


# ------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg whatever pyplot's backend is; no global state touched
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Atomically: no half-written PNG is ever left."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def _line(ax, steps: list, values: list, **kwargs) -> None:
    if steps:  # markers while the points are few enough to tell apart
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, **kwargs)


def draw_loss(train: list[dict], valid: list[dict], path: Path) -> Path:
    fig = _figure(8, 8)
    top, middle, bottom = fig.subplots(3, 1, sharex=True)
    _line(top, *_series(train, "loss"), label="loss (LM + aux)")
    _line(top, *_series(train, "lm_loss"), label="lm_loss", linestyle="--")
    if valid:
        top.plot(*_series(valid, "valid_loss"), "o", color="black", label="valid_loss")
    top.set_ylabel("loss")
    top.legend()
    _line(middle, *_series(train, "aux_loss"), color="tab:green")
    middle.set_ylabel("aux_loss (router)")
    _line(bottom, *_series(train, "lr"), color="tab:purple")
    bottom.set_ylabel("lr", color="tab:purple")
    grad = bottom.twinx()
    _line(grad, *_series(train, "grad_norm"), color="tab:orange")
    grad.set_ylabel("grad_norm", color="tab:orange")
    bottom.set_xlabel("step")
    for ax in (top, middle, bottom):
        ax.grid(alpha=0.3)
    fig.suptitle("training loss")
    return save_png(fig, path)


def draw_expert_load(matrix: np.ndarray, edges: np.ndarray, path: Path) -> Path:
    layers, experts, _ = matrix.shape
    rows = math.ceil(layers / 8)
    cols = math.ceil(layers / rows)
    fig = _figure(2.4 * cols + 1.2, 1.8 * rows + 0.8)
    grid = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    # white at the balanced share 1/E; a single expert is always "balanced" at share 1
    norm = TwoSlopeNorm(vcenter=1 / experts, vmin=0, vmax=1) if experts > 1 else Normalize(0, 1)
    for layer, ax in enumerate(grid[:layers]):
        mesh = ax.pcolormesh(edges, np.arange(experts + 1) - 0.5, matrix[layer], cmap="RdBu_r",
                             norm=norm)
        ax.set_title(f"layer {layer + 1}", fontsize=8)
        ax.set_yticks(range(0, experts, max(1, experts // 4)))
        ax.tick_params(labelsize=7, labelbottom=layer + cols >= layers,
                       labelleft=layer % cols == 0)
        if layer % cols == 0:
            ax.set_ylabel("expert", fontsize=8)
        if layer + cols >= layers:
            ax.set_xlabel("step", fontsize=8)
    for ax in grid[layers:]:
        ax.set_visible(False)
    bar = fig.colorbar(mesh, ax=list(grid[:layers]), shrink=0.9)
    bar.set_ticks(sorted({0.0, 1 / experts, 0.5, 1.0}))
    bar.set_label("share of the layer's routed tokens", fontsize=8)
    fig.suptitle(f"expert load per layer: white = balanced (1/{experts}), red = busier, "
                 "blue = idler", fontsize=10)
    return save_png(fig, path)


def draw_imbalance(ratio: np.ndarray, edges: np.ndarray, experts: int, path: Path) -> Path:
    layers = ratio.shape[0]
    fig = _figure(8, min(2 + 0.2 * layers, 14))
    ax = fig.subplots()
    mesh = ax.pcolormesh(edges, np.arange(layers + 1) + 0.5, ratio, cmap="viridis", vmin=1,
                         vmax=experts)
    ax.set_yticks(range(1, layers + 1, max(1, layers // 10)))
    ax.invert_yaxis()  # layer 1 on top
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    fig.colorbar(mesh, ax=ax, label="busiest share / mean share")
    fig.suptitle(f"expert-load imbalance per layer: 1 = balanced, {experts} = every token on "
                 "one expert", fontsize=10)
    return save_png(fig, path)
