"""A model from a PESC checkpoint and back: `load` builds this rank's part of the model for
any TP/PP/EP (megatron-core reshards on load) and fills it from a base checkpoint and the
training checkpoint on top of it, if any; `save` writes a model as a base checkpoint. The
layout is in checkpoint/format.py."""
from __future__ import annotations

import ctypes
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
    read_shard,
    save_sharded,
    sharded_roles,
    trainable_sharded_state_dict,
)
from pesc_megatron.model.builder import build_model
from pesc_megatron.model.config import LoRAConfig
from pesc_megatron.model.precision import LOW_PRECISION, PrecisionConfig
from pesc_megatron.model.quantized import (
    QUANTIZED_MODULES,
    calibration_batches,
    convert_frozen_weights,
    input_mean_squares,
    pick_exact_columns,
    quantize_frozen,
    resolve_matmul,
)
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
    settings. `precision`: `frozen_weights` fp8 or nf4 stores the frozen weights in that format,
    one weight matrix at a time as they load (model/quantized.py); `fp8` builds with Transformer Engine's
    linears (GPU). `base`: where a training checkpoint's base is, if it moved.
    `build_options` go to `build_model`."""
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
    quantize = precision is not None and precision.frozen_weights in LOW_PRECISION
    if not quantize:
        fill(model, info, trained_lora)
        return model, info
    matmul = resolve_matmul(precision.frozen_weights, precision.fp8_matmul)
    return_freed_memory(True)
    try:
        fill(model, info, trained_lora, precision.frozen_weights, matmul)
        quantize_rest(model, info, parallel, precision, matmul)
    finally:
        return_freed_memory(False)
    return model, info


def fill(model, info: CheckpointInfo, trained_lora: bool, frozen_weights: str | None = None,
         matmul: str | None = None) -> None:
    """Loads the base checkpoint into `model`, then the training checkpoint's routers,
    adapters and (`trained_lora`) LoRA, if any. With a low-precision `frozen_weights` the base
    is loaded one frozen weight matrix at a time (all layers' of it at once: megatron-core
    stacks them in one tensor) and each converted at once, so that the high-precision base
    shrinks as it loads."""
    # The base has no LoRA weights: they keep their init (B = 0) unless trained ones follow.
    entries = model.sharded_state_dict()
    roles = sharded_roles(model, entries)
    trained = trainable_sharded_state_dict(model, trained_lora, entries)
    base_state = {k: v for k, v in entries.items() if roles[k] != "lora"}
    del entries
    missing = None  # what no group loaded
    for modules, group in load_groups(model, base_state, roles,
                                      by_weight=frozen_weights is not None):
        state = dist_checkpointing.load(group, str(info.base / WEIGHTS))
        result = model.load_state_dict(state, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
        missing = set(result.missing_keys) if missing is None else missing & set(
            result.missing_keys)
        del group, state  # they reference the weights: the conversion frees each one
        for name in modules:
            quantize_frozen(model.get_submodule(name), frozen_weights, matmul, prefix=name)
    params = dict(model.named_parameters())
    assert all(getattr(params.get(k), "pesc_role", None) == "lora" for k in missing), missing
    if info.trained is not None:
        state = dist_checkpointing.load({"model": trained}, str(info.trained / WEIGHTS))
        model.load_state_dict(state["model"], strict=False)


def return_freed_memory(eager: bool) -> None:
    """glibc's malloc serves a large allocation from its own mapping (returned to the system
    when freed) only above a threshold that rises to the largest block freed so far, up to 32
    MiB: the high-precision weights a conversion frees would then stay in the process for
    later allocations, and the converted base would load with a higher peak than the
    high-precision one. `eager` lowers the threshold to 256 KiB for the load; after it, 32 MiB
    (where the rising threshold ends up). Nothing where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_MMAP_THRESHOLD = -3  # malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 2**18 if eager else 2**25)


def load_groups(model, state: dict, roles: dict, by_weight: bool):
    """(names of the modules whose frozen weight it holds, entries) for each frozen weight
    matrix of the decoder layers in `state` (keys of `model.sharded_state_dict()`), grouped by
    checkpoint key, then ((), the rest: norms, routers, adapters, embedding, output layer); all
    in one group unless `by_weight`. Every rank has the same layer weights (also at PP and EP),
    hence the same groups in the same order, as the collective loads need. Pops what it
    yields."""
    groups = {}
    for k, v in state.items():
        module = k.rsplit(".", 1)[0]
        if (by_weight and k.startswith("decoder.layers.") and k.endswith(".weight")
                and roles[k] is None
                and isinstance(model.get_submodule(module), QUANTIZED_MODULES)):
            groups.setdefault(v.key, []).append(k)
    # The smallest first: the first is loaded beside the whole high-precision base, the later
    # ones into the memory the earlier conversions freed.
    for key in sorted(groups, key=lambda g: (sum(state[k].data.numel() for k in groups[g]), g)):
        keys = groups[key]
        yield [k.rsplit(".", 1)[0] for k in keys], {k: state.pop(k) for k in keys}
    yield (), {k: state.pop(k) for k in list(state)}


def quantize_rest(model, info: CheckpointInfo, parallel: ParallelConfig,
                  precision: PrecisionConfig, matmul: str) -> None:
    """What the grouped load left: NF4 linears' exact columns (`exact_columns_from_base`), then
    the high-precision rest (an untied embedding; with `precision.quantize_output_layer`, the
    logits' weights), converted once the model is complete, because the output layer's
    outlier columns are found by a forward pass (4 x 64 tokens, every rank) through the
    converted layers."""
    seq = -(-64 // parallel.tp) * parallel.tp  # sequence parallelism splits it over TP
    batches = calibration_batches(info.model.vocab_size, seq)

    def calibrate():
        forward_only(model, batches, seq, 1)

    if precision.frozen_weights == "nf4" and precision.linear_outliers > 0:
        exact_columns_from_base(model, info, precision.linear_outliers, calibrate)
    convert_frozen_weights(model, precision.frozen_weights, matmul,
                           precision.quantize_output_layer, precision.output_outliers,
                           calibrate=calibrate)


def exact_columns_from_base(model, info: CheckpointInfo, count: int, calibrate) -> None:
    """Every NF4 linear of the decoder layers keeps its `count` costliest input columns exact
    (`pick_exact_columns`): their inputs' mean squares come from a calibration pass through
    the converted layers (its TP reductions run in `fill`'s order of the linears, the same on
    every rank), their high-precision values from a second read of the base, one layer's
    matrix at a time and without collectives (`read_shard`)."""
    entries = model.sharded_state_dict()
    groups = [(modules, group) for modules, group in
              load_groups(model, entries, sharded_roles(model, entries), by_weight=True)
              if modules]
    linears = {name: model.get_submodule(name) for modules, _ in groups for name in modules}
    input_ms = input_mean_squares(linears, calibrate)
    for _, group in groups:
        for key, entry in group.items():
            name = key.rsplit(".", 1)[0]
            exact = read_shard(entry, info.base / WEIGHTS)  # the model's weight is NF4 now
            pick_exact_columns(linears[name], exact, input_ms[name], count)
