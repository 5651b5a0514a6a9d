"""The on-disk layout of PESC checkpoints and how to read their settings (no torch needed).

    CKPT/pesc.json       format, ModelConfig, PESCConfig, dtype
    CKPT/hf_config.json  the source Hugging Face config (for export)
    CKPT/weights/        dist_checkpointing (torch_dist), loadable at any TP/PP/EP
    CKPT/tokenizer/      the source tokenizer files

A training checkpoint (`pesc train`) holds only what training changes and points to its base:

    RUN/checkpoints/latest               name of the newest iter_* folder
    RUN/checkpoints/latest_checkpointed_iteration.txt   its iteration (Megatron-LM's tracker)
    RUN/checkpoints/iter_NNNNNNN/train_state.json   base path (relative to RUN, and absolute),
                                                    iteration, data position, config
    RUN/checkpoints/iter_NNNNNNN/weights/           dist_checkpointing: router and adapter
                                                    weights ("model") and optimizer state
Every reader accepts a base checkpoint, a training checkpoint, its `checkpoints` folder or
the run folder (both resolve through `latest`). A training checkpoint finds its base through
the path relative to its run folder (a run moved together with its base), else the absolute
one, else the `base` the caller gives (a base moved elsewhere: `--base`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from pesc_megatron.model.config import LoRAConfig, ModelConfig, PESCConfig
from pesc_megatron.schema import ConfigError, from_dict

FORMAT = "pesc-megatron/1"
TRAIN_FORMAT = "pesc-megatron-train/1"
META, HF_CONFIG, WEIGHTS, TOKENIZER = "pesc.json", "hf_config.json", "weights", "tokenizer"
TRAIN_META, LATEST = "train_state.json", "latest"
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"


@dataclasses.dataclass
class CheckpointInfo:
    model: ModelConfig
    pesc: PESCConfig
    dtype: str
    hf_config: dict
    base: Path = None  # the folder with the frozen weights, config and tokenizer
    trained: Optional[Path] = None  # a training checkpoint on top of `base`, if any
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)  # the training's LoRA


def run_folder(trained: Path) -> Path:
    """RUN of RUN/checkpoints/iter_NNNNNNN."""
    return trained.resolve().parent.parent


def base_identity(base: Path) -> str:
    """A digest of a base checkpoint's settings and source config (pesc.json, hf_config.json):
    tells a run's base from another checkpoint at the same path (not its weights)."""
    digest = hashlib.sha256()
    for name in (META, HF_CONFIG):
        if (base / name).is_file():
            digest.update((base / name).read_bytes())
    return digest.hexdigest()[:16]


def base_paths(trained: Path, base: Path) -> dict:
    """How a training checkpoint in `trained` records its `base` (train_state.json)."""
    base = base.resolve()
    return dict(base=os.path.relpath(base, run_folder(trained)), base_absolute=str(base),
                base_identity=base_identity(base))


def is_base_of(path: Path, state: dict) -> bool:
    """Whether `path` is a base checkpoint, and the one `state` recorded (if it recorded it)."""
    return (path / META).is_file() and state.get("base_identity", base_identity(path)) == \
        base_identity(path)


def find_base(trained: Path, state: dict, base: str | Path | None = None) -> Path:
    """The base checkpoint of the training checkpoint `trained`: `base` if given, else the
    recorded path relative to the run folder, else the recorded absolute path."""
    if base is not None:
        candidates = [Path(base)]
    else:
        recorded = Path(state["base"])
        candidates = [recorded] if recorded.is_absolute() else [
            Path(os.path.normpath(run_folder(trained) / recorded)),
            Path(state.get("base_absolute", recorded))]
    for path in candidates:
        if is_base_of(path, state):
            return path
    if base is not None:
        raise ConfigError(f"--base {base}: " + (
            f"not a base checkpoint (no {META})" if not (Path(base) / META).is_file() else
            f"not the base {trained} was trained from ({META} or {HF_CONFIG} differ)"))
    raise ConfigError(f"{trained}: its base checkpoint is missing: neither "
                      f"{' nor '.join(str(p) for p in dict.fromkeys(candidates))} exists (moved? "
                      "give its new place with --base, or model.checkpoint to resume)")


def resolve(ckpt: str | Path, base: str | Path | None = None
            ) -> tuple[Path, Optional[Path]]:
    """(base checkpoint, training checkpoint or None) for any folder the loaders accept;
    `base` overrides where a training checkpoint's base is."""
    ckpt = Path(ckpt)
    for folder in (ckpt, ckpt / "checkpoints"):
        if (folder / LATEST).is_file():
            ckpt = folder / (folder / LATEST).read_text().strip()
            break
    if (ckpt / TRAIN_META).is_file():
        state = json.loads((ckpt / TRAIN_META).read_text())
        if state.get("format") != TRAIN_FORMAT:
            raise ConfigError(f"{ckpt / TRAIN_META}: format {state.get('format')!r}, expected "
                              f"{TRAIN_FORMAT!r}")
        return find_base(ckpt, state, base), ckpt
    if not (ckpt / META).is_file():
        raise ConfigError(f"{ckpt}: not a pesc-megatron checkpoint (no {META}, {TRAIN_META} "
                          f"or {LATEST})")
    return ckpt, None


def read_info(ckpt: str | Path, base: str | Path | None = None) -> CheckpointInfo:
    base, trained = resolve(ckpt, base)
    info = _read_base_info(base)
    info.base, info.trained = base, trained
    if trained is not None:  # the run's training-time PESC settings (capacity, dispatcher, ...)
        state = json.loads((trained / TRAIN_META).read_text())
        resolved = state.get("config", {}).get("resolved", {})
        info.pesc = dataclasses.replace(info.pesc, **(resolved.get("pesc") or {}))
        info.lora = from_dict(LoRAConfig, resolved.get("lora") or {},
                              f"{trained / TRAIN_META}: lora.")
    return info


def _read_base_info(ckpt: Path) -> CheckpointInfo:
    meta_path = ckpt / META
    if not meta_path.is_file():
        raise ConfigError(f"{ckpt}: not a pesc-megatron checkpoint (no {META})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    hf_path = ckpt / HF_CONFIG
    return CheckpointInfo(
        model=from_dict(ModelConfig, meta["model"], f"{meta_path}: model."),
        pesc=from_dict(PESCConfig, meta["pesc"], f"{meta_path}: pesc."),
        dtype=meta["dtype"],
        hf_config=json.loads(hf_path.read_text()) if hf_path.is_file() else {})


def write_meta(folder: Path, info: CheckpointInfo) -> None:
    """pesc.json and hf_config.json of a base checkpoint (into a folder being staged)."""
    meta = dict(format=FORMAT, model=dataclasses.asdict(info.model),
                pesc=dataclasses.asdict(info.pesc), dtype=info.dtype)
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")
    (folder / HF_CONFIG).write_text(json.dumps(info.hf_config, indent=2) + "\n")


def check_out(out: Path, force: bool, source: Path | None = None) -> None:
    if source is not None and out.resolve() == Path(source).resolve():
        raise ConfigError(f"--out {out} is the input itself; choose another folder")
    if out.exists() and not force:
        raise ConfigError(f"--out {out} exists (use --force to replace it)")


def check_lora(info: CheckpointInfo, lora: LoRAConfig, ckpt) -> None:
    """A checkpoint trained with LoRA continues only with the same LoRA shape."""
    if info.lora.enabled and lora.shape() != info.lora.shape():
        raise ConfigError(
            f"lora: {ckpt} was trained with LoRA {info.lora.shape()}, the job asks for "
            f"{lora.shape()}; use the same lora settings (or export it first)")
