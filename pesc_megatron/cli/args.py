"""Argument groups the commands share, built from the settings dataclasses: one flag name per
setting (`--num-experts` for `pesc.num_experts`), its type, choices and default from there."""
from __future__ import annotations

import argparse
import dataclasses
import typing

from pesc_megatron.model.config import (
    ACTIVATIONS,
    DISPATCHERS,
    LORA_TARGETS,
    ROUTINGS,
    LoRAConfig,
    PESCConfig,
)
from pesc_megatron.model.precision import FP8_MATMULS, FROZEN_WEIGHTS, PrecisionConfig

CHOICES = {"routing": ROUTINGS, "adapter_activation": ACTIVATIONS, "dispatcher": DISPATCHERS,
           "frozen_weights": FROZEN_WEIGHTS, "fp8_matmul": FP8_MATMULS}
# Earlier spellings, still accepted.
ALIASES = {"num_experts": ("--experts",)}
PESC_SHAPE = ("num_experts", "topk", "adapter_dim")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_fields(ap, cls, names, defaults: dict, section: str, helps: dict,
                unset: str = "") -> None:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        hint = hints[name]
        if typing.get_origin(hint) is typing.Union:  # Optional[X]
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        default = defaults.get(name)
        shown = default if name in defaults else fields[name].default
        text = helps.get(name, f"{section}.{name}")
        shown = f"{unset}, else {shown}" if unset else shown
        kwargs = dict(default=default, help=f"{text} (default: {shown})")
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=hint, choices=CHOICES.get(name))
        ap.add_argument(flag(name), *ALIASES.get(name, ()), dest=name, **kwargs)


def add_pesc_args(ap, names=PESC_SHAPE, defaults: dict | None = None,
                  unset: str = "the source's") -> None:
    """PESCConfig's `names` as flags. Without `defaults` a flag left out is None (keeps
    `unset`, e.g. the source checkpoint's setting)."""
    _add_fields(ap, PESCConfig, names, defaults or {}, "pesc", {}, "" if defaults else unset)


def pesc_values(args, names=PESC_SHAPE) -> dict:
    """The PESC settings given on the command line."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def add_lora_args(ap, targets: bool = True, rank_help: str = "") -> None:
    ap.add_argument("--lora-rank", type=int, help=rank_help or "add (or resize) LoRA; 0 "
                    "removes it")
    if targets:
        ap.add_argument("--lora-targets", help="comma-separated projections (default: all "
                        f"seven: {','.join(LORA_TARGETS)})")


def lora_from_args(args, lora: LoRAConfig, default_rank: int | None = None) -> LoRAConfig:
    """`lora` changed by --lora-targets / --lora-rank (0: no LoRA). `default_rank`: LoRA of
    that rank on all seven projections where neither the flags nor `lora` set one."""
    if getattr(args, "lora_targets", None) is not None:
        lora = dataclasses.replace(lora, targets=args.lora_targets.split(","))
    if args.lora_rank == 0:
        return LoRAConfig()
    rank = args.lora_rank or (default_rank if not lora.enabled else None)
    if rank is None:
        return lora
    return dataclasses.replace(lora, rank=rank, targets=lora.targets or list(LORA_TARGETS))


PRECISION_FLAGS = ("frozen_weights", "fp8_matmul", "quantize_output_layer", "output_outliers",
                   "linear_outliers")


def add_precision_args(ap) -> None:
    """The frozen base's storage (torchao FP8 or NF4, without Transformer Engine), as
    `precision.*`."""
    _add_fields(ap, PrecisionConfig, PRECISION_FLAGS,
                {n: getattr(PrecisionConfig(), n) for n in PRECISION_FLAGS}, "precision", {
                    "frozen_weights": "storage of the frozen base (None: as --dtype); fp8: torchao "
                    "e4m3; nf4: QLoRA's 4-bit NormalFloat",
                    "fp8_matmul": "with --frozen-weights fp8: scaled_mm (FP8 products) or "
                    "dequantize (high-precision products)",
                    "quantize_output_layer": "with --frozen-weights fp8|nf4: the output layer "
                    "(or tied embedding) too",
                    "output_outliers": "with --quantize-output-layer: hidden columns of the "
                    "output layer kept in high precision",
                    "linear_outliers": "with --frozen-weights nf4: input columns of each layer "
                    "linear kept in high precision"})


def precision_from_args(args) -> PrecisionConfig:
    return PrecisionConfig(**{n: getattr(args, n) for n in PRECISION_FLAGS})


def add_parallel_args(ap, keys=("tp", "pp", "ep", "etp"), default: int | None = 1,
                      help: str = "") -> None:
    for key in keys:
        ap.add_argument(flag(key), type=int, default=default,
                        help=help.format(KEY=key.upper()) or f"parallel.{key}")
