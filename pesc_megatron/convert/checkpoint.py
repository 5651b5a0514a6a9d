"""PESC checkpoints: megatron-core `dist_checkpointing` weights plus the settings to rebuild
the model, written atomically and loadable at any TP/PP/EP (megatron-core reshards on load).

    CKPT/pesc.json       format, ModelConfig, PESCConfig, dtype
    CKPT/hf_config.json  the source Hugging Face config (for export)
    CKPT/weights/        dist_checkpointing (torch_dist)
    CKPT/tokenizer/      the source tokenizer files

A training checkpoint (`pesc train`) holds only what training changes and points to its base:

    RUN/checkpoints/latest               name of the newest iter_* folder
    RUN/checkpoints/iter_NNNNNNN/train_state.json   base path, iteration, data position, config
    RUN/checkpoints/iter_NNNNNNN/weights/           dist_checkpointing: router and adapter
                                                    weights ("model") and optimizer state
Every loader here accepts a base checkpoint, a training checkpoint, its `checkpoints` folder or
the run folder (both resolve through `latest`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing

from pesc_megatron.config import (
    ConfigError,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    PESCConfig,
    PrecisionConfig,
    from_dict,
    validate_layout,
)
from pesc_megatron.model.builder import build_model, is_trainable
from pesc_megatron.model.fp8 import calibration_batch, convert_frozen_weights
from pesc_megatron.runtime.distributed import is_rank0
from pesc_megatron.train.step import forward_only

FORMAT = "pesc-megatron/1"
TRAIN_FORMAT = "pesc-megatron-train/1"
META, HF_CONFIG, WEIGHTS, TOKENIZER = "pesc.json", "hf_config.json", "weights", "tokenizer"
TRAIN_META, LATEST = "train_state.json", "latest"


@dataclasses.dataclass
class CheckpointInfo:
    model: ModelConfig
    pesc: PESCConfig
    dtype: str
    hf_config: dict
    base: Path = None  # the folder with the frozen weights, config and tokenizer
    trained: Optional[Path] = None  # a training checkpoint on top of `base`, if any
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)  # the training's LoRA


def resolve(ckpt: str | Path) -> tuple[Path, Optional[Path]]:
    """(base checkpoint, training checkpoint or None) for any folder the loaders accept."""
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
        base = Path(state["base"])
        if not (base / META).is_file():
            raise ConfigError(f"{ckpt}: its base checkpoint {base} is missing")
        return base, ckpt
    if not (ckpt / META).is_file():
        raise ConfigError(f"{ckpt}: not a pesc-megatron checkpoint (no {META}, {TRAIN_META} "
                          f"or {LATEST})")
    return ckpt, None


def read_info(ckpt: str | Path) -> CheckpointInfo:
    base, trained = resolve(ckpt)
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


def check_out(out: Path, force: bool, source: Path | None = None) -> None:
    if source is not None and out.resolve() == Path(source).resolve():
        raise ConfigError(f"--out {out} is the input itself; choose another folder")
    if out.exists() and not force:
        raise ConfigError(f"--out {out} exists (use --force to replace it)")


def _new_partial(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))


def publish(partial: Path, out: Path) -> None:
    """Moves the finished folder `partial` to `out`, replacing an old `out` only at the end."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)  # left by an earlier interrupted replacement
    if out.exists():
        os.replace(out, old)
    os.replace(partial, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged(out: Path):
    """Yields a fresh folder beside `out` (single process); it becomes `out` when the block
    succeeds and is removed when it fails, so `out` is never half-written."""
    partial = _new_partial(out)
    try:
        yield partial
        publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(model, out: str | Path, info: CheckpointInfo, tokenizer_files=(),
         force: bool = False) -> Path:
    """Saves `model` (any parallel layout; called on every rank) into `out` atomically: all is
    written to a fresh folder beside it, renamed at the end, so `out` is never half-written."""
    out = Path(out)
    check_out(out, force)  # on every rank (shared file system), before any collective

    def write_files(partial: Path) -> None:
        meta = dict(format=FORMAT, model=dataclasses.asdict(info.model),
                    pesc=dataclasses.asdict(info.pesc), dtype=info.dtype)
        (partial / META).write_text(json.dumps(meta, indent=2) + "\n")
        (partial / HF_CONFIG).write_text(json.dumps(info.hf_config, indent=2) + "\n")
        if tokenizer_files:
            (partial / TOKENIZER).mkdir()
            for f in tokenizer_files:
                shutil.copy2(f, partial / TOKENIZER / Path(f).name)

    save_sharded(out, model.sharded_state_dict(), write_files)
    return out


def save_sharded(out: Path, sharded_state: dict, write_files: Callable[[Path], None]) -> None:
    """Called on every rank: `sharded_state` through dist_checkpointing into `WEIGHTS`, then rank
    0's `write_files(folder)`, all in a fresh hidden folder beside `out` that becomes `out` only
    when complete (an old `out` is replaced at that moment); removed if anything fails."""
    name = [str(_new_partial(out)) if is_rank0() else None]
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    partial = Path(name[0])
    try:
        if is_rank0():
            (partial / WEIGHTS).mkdir()
        _barrier()
        dist_checkpointing.save(sharded_state, str(partial / WEIGHTS))
        if is_rank0():
            write_files(partial)
            publish(partial, out)
    except BaseException:
        if is_rank0():
            shutil.rmtree(partial, ignore_errors=True)
        raise
    _barrier()


def trainable_sharded_state_dict(model, with_lora: bool = True) -> dict:
    """The router, adapter and (`with_lora`) LoRA entries of `model.sharded_state_dict()`
    (what training changes)."""
    return {k: v for k, v in model.sharded_state_dict().items()
            if is_trainable("." + k) and not k.endswith("_extra_state")
            and (with_lora or not _is_lora(k))}


def _is_lora(key: str) -> bool:
    return ".lora." in key


def load(ckpt: str | Path, parallel: ParallelConfig, dtype: str | None = None,
         initialize: bool = False, pesc_overrides: dict | None = None,
         lora: LoRAConfig | None = None, precision: PrecisionConfig | None = None,
         **build_options):
    """Builds this rank's part of the model for `parallel` and loads the checkpoint into it
    (a training checkpoint: its base, then its routers, adapters and LoRA). Needs
    `runtime.distributed.initialize(parallel)` first. Returns (model, info). The random init is
    skipped (`initialize=False`): every weight comes from the checkpoint. `pesc_overrides`
    changes training-time PESC settings. `lora` (a training job's) adds fresh LoRA weights
    where the checkpoint has none; a checkpoint trained with LoRA must be given the same
    settings. `precision`: `frozen_weights="fp8"` stores the frozen weights in FP8 once loaded
    (model/fp8.py); `fp8` builds with Transformer Engine's linears (GPU). `build_options` go to
    `build_model`."""
    ckpt = Path(ckpt)
    info = read_info(ckpt)
    if pesc_overrides:
        info.pesc = dataclasses.replace(info.pesc, **pesc_overrides)
    trained_lora = info.lora.enabled
    if lora is not None:
        check_lora(info, lora, ckpt)
        info.lora = lora
    world = dist.get_world_size() if dist.is_initialized() else 1
    try:
        validate_layout(info.model, info.pesc, parallel, world)
    except ConfigError as e:
        raise ConfigError(f"{ckpt}: {e}") from None
    model = build_model(info.model, info.pesc, parallel, dtype or info.dtype,
                        initialize=initialize, lora=info.lora, precision=precision,
                        **build_options)
    # The base has no LoRA weights: they keep their init (B = 0) unless trained ones follow.
    base_state = {k: v for k, v in model.sharded_state_dict().items() if not _is_lora(k)}
    state = dist_checkpointing.load(base_state, str(info.base / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(_is_lora(k) for k in missing), (missing, unexpected)
    if info.trained is not None:
        state = dist_checkpointing.load(
            {"model": trainable_sharded_state_dict(model, with_lora=trained_lora)},
            str(info.trained / WEIGHTS))
        model.load_state_dict(state["model"], strict=False)
    # The sharded state dicts reference every weight: drop them so that the FP8 conversion
    # frees each high-precision weight as it replaces it.
    del base_state, state
    if precision is not None and precision.frozen_weights == "fp8":
        convert_to_fp8(model, info, parallel, precision)
    return model, info


def convert_to_fp8(model, info: CheckpointInfo, parallel: ParallelConfig,
                   precision: PrecisionConfig) -> None:
    """`precision.frozen_weights=fp8` on a loaded model; its calibration pass (which columns
    of the output layer stay in high precision) is one forward of 256 tokens, every rank."""
    seq = -(-256 // parallel.tp) * parallel.tp  # sequence parallelism splits it over TP
    batch = calibration_batch(info.model.vocab_size, seq)
    convert_frozen_weights(model, precision.fp8_matmul, precision.fp8_output_layer,
                           precision.fp8_output_outliers,
                           calibrate=lambda: forward_only(model, [batch], seq, 1))


def check_lora(info: CheckpointInfo, lora: LoRAConfig, ckpt) -> None:
    """A checkpoint trained with LoRA continues only with the same LoRA shape."""
    if info.lora.enabled and lora_shape(lora) != lora_shape(info.lora):
        raise ConfigError(
            f"lora: {ckpt} was trained with LoRA {lora_shape(info.lora)}, the job asks for "
            f"{lora_shape(lora)}; use the same lora settings (or export it first)")


def lora_shape(lora: LoRAConfig) -> dict:
    """The settings that fix LoRA's weights (dropout may change between runs)."""
    return dict(targets=sorted(lora.targets), rank=lora.rank, alpha=lora.alpha)
