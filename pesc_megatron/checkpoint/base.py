"""A model from a PESC checkpoint and back: `load` builds this rank's part of the model for
any TP/PP/EP (megatron-core reshards on load) and fills it from a base checkpoint and the
training checkpoint on top of it, if any; `save` writes a model as a base checkpoint. The
layout is in checkpoint/format.py."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing

from pesc_megatron.checkpoint.format import (
    TOKENIZER,
    WEIGHTS,
    CheckpointInfo,
    check_lora,
    check_out,
    read_info,
    write_meta,
)
from pesc_megatron.checkpoint.sharded import (
    save_sharded,
    sharded_roles,
    trainable_sharded_state_dict,
)
from pesc_megatron.model.builder import build_model
from pesc_megatron.model.config import LoRAConfig
from pesc_megatron.model.fp8 import calibration_batch, convert_frozen_weights
from pesc_megatron.model.precision import PrecisionConfig
from pesc_megatron.parallel.config import ParallelConfig, validate_layout
from pesc_megatron.schema import ConfigError
from pesc_megatron.train.step import forward_only


def save(model, out: str | Path, info: CheckpointInfo, tokenizer_files=(),
         force: bool = False) -> Path:
    """Saves `model` (any parallel layout; called on every rank) into `out` atomically: all is
    written to a fresh folder beside it, renamed at the end, so `out` is never half-written."""
    out = Path(out)
    check_out(out, force)  # on every rank (shared file system), before any collective

    def write_files(partial: Path) -> None:
        write_meta(partial, info)
        if tokenizer_files:
            (partial / TOKENIZER).mkdir()
            for f in tokenizer_files:
                shutil.copy2(f, partial / TOKENIZER / Path(f).name)

    save_sharded(out, model.sharded_state_dict(), write_files)
    return out


def load(ckpt: str | Path, parallel: ParallelConfig, dtype: str | None = None,
         initialize: bool = False, pesc_overrides: dict | None = None,
         lora: LoRAConfig | None = None, precision: PrecisionConfig | None = None,
         base: str | Path | None = None, **build_options):
    """Builds this rank's part of the model for `parallel` and loads the checkpoint into it
    (a training checkpoint: its base, then its routers, adapters and LoRA). Needs
    `parallel.distributed.initialize(parallel)` first. Returns (model, info). The random init is
    skipped (`initialize=False`): every weight comes from the checkpoint. `pesc_overrides`
    changes training-time PESC settings. `lora` (a training job's) adds fresh LoRA weights
    where the checkpoint has none; a checkpoint trained with LoRA must be given the same
    settings. `precision`: `frozen_weights="fp8"` stores the frozen weights in FP8 once loaded
    (model/fp8.py); `fp8` builds with Transformer Engine's linears (GPU). `base`: where a
    training checkpoint's base is, if it moved. `build_options` go to `build_model`."""
    ckpt = Path(ckpt)
    info = read_info(ckpt, base)
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
    entries = model.sharded_state_dict()
    roles = sharded_roles(model, entries)
    base_state = {k: v for k, v in entries.items() if roles[k] != "lora"}
    state = dist_checkpointing.load(base_state, str(info.base / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters())
    lora_only = all(getattr(params.get(k), "pesc_role", None) == "lora" for k in missing)
    assert not unexpected and lora_only, (missing, unexpected)
    if info.trained is not None:
        state = dist_checkpointing.load(
            {"model": trainable_sharded_state_dict(model, with_lora=trained_lora)},
            str(info.trained / WEIGHTS))
        model.load_state_dict(state["model"], strict=False)
    # The sharded state dicts reference every weight: drop them so that the FP8 conversion
    # frees each high-precision weight as it replaces it.
    del entries, base_state, state
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
