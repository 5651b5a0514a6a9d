"""Storage and arithmetic of the frozen base (`PrecisionConfig`), and the check that this
machine can run what it asks for."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from pesc_megatron.schema import ConfigError, invalid

FROZEN_WEIGHTS = ("fp32", "bf16", "fp8", "nf4")
LOW_PRECISION = ("fp8", "nf4")  # stored in torchao tensors, computed in the model dtype
# NF4's layout (model/nf4.py), here without torch for the planner: values per absmax, and
# absmaxes per double-quantization scale at most (QLoRA's defaults).
NF4_BLOCK_SIZE = 64
NF4_MAX_SCALER_BLOCK = 256
FP8_MATMULS = ("auto", "dequantize", "scaled_mm")
TE_FP8_RECIPES = ("delayed", "tensorwise", "blockwise")  # megatron-core's fp8_recipe names


@dataclass
class PrecisionConfig:
    """Storage and arithmetic of the frozen base. Routers, adapters, LoRA and norms keep the
    model dtype (and routers fp32) whatever is chosen here."""

    SECTION: ClassVar[str] = "precision"
    # None: model.dtype; fp8: torchao e4m3 (model/fp8.py); nf4: QLoRA's 4 bits (model/nf4.py)
    frozen_weights: Optional[str] = None
    fp8_matmul: str = "auto"  # frozen_weights=fp8: auto | dequantize | scaled_mm
    # frozen_weights=fp8|nf4: the logits' weights (output layer, a tied embedding) too, with
    # `output_outliers` of their hidden columns in high precision (model/quantized.py)
    quantize_output_layer: bool = True
    output_outliers: int = 32
    # frozen_weights=nf4: input columns of each decoder linear's weight kept exact (the
    # costliest for its output: model/quantized.py); fp8 keeps none (its rounding is finer)
    linear_outliers: int = 16
    fp8: Optional[str] = None  # Transformer Engine FP8 recipe (GPU with TE only)
    fp8_margin: int = 0  # TE: scale = max representable / (amax * 2^margin)
    fp8_amax_history_len: int = 1  # TE delayed scaling: amaxes kept per tensor

    def __post_init__(self):
        def bad(key, msg):
            raise invalid(self.SECTION, self, key, msg)

        if self.frozen_weights is not None and self.frozen_weights not in FROZEN_WEIGHTS:
            bad("frozen_weights", f"must be one of {', '.join(FROZEN_WEIGHTS)} (or null: the "
                "model dtype)")
        if self.fp8_matmul not in FP8_MATMULS:
            bad("fp8_matmul", f"must be one of {', '.join(FP8_MATMULS)}")
        if self.fp8 is not None and self.fp8 not in TE_FP8_RECIPES:
            bad("fp8", f"must be one of {', '.join(TE_FP8_RECIPES)} (or null: no Transformer "
                "Engine FP8)")
        if self.fp8 is not None and self.frozen_weights in LOW_PRECISION:
            bad("fp8", f"Transformer Engine FP8 and precision.frozen_weights="
                f"{self.frozen_weights} exclude each other (TE's linears keep their own "
                "weights); choose one")
        if self.output_outliers < 0:
            bad("output_outliers", "must be >= 0 (0: the whole output layer in low precision)")
        if self.linear_outliers < 0:
            bad("linear_outliers", "must be >= 0 (0: every column of the layers in NF4)")
        if self.fp8_margin < 0:
            bad("fp8_margin", "must be >= 0")
        if self.fp8_amax_history_len < 1:
            bad("fp8_amax_history_len", "must be >= 1")


def scaler_block_size(numel: int) -> int:
    """NF4's double-quantization group for a shard of `numel` values: 256 blocks where that
    divides the shard (torchao needs whole groups), else the largest power of two that does
    (SmolLM2's 576 x 576: 64 blocks), which only costs a few more scales."""
    blocks = numel // NF4_BLOCK_SIZE
    return next(g for g in (NF4_MAX_SCALER_BLOCK >> i for i in range(9)) if blocks % g == 0)


def validate_precision(p: PrecisionConfig, dtype: str) -> None:
    """Checks the frozen weights' storage against the model dtype `dtype` (the base computes
    in it, so only fp8 or nf4 storage may differ)."""
    if p.frozen_weights in ("fp32", "bf16") and p.frozen_weights != dtype:
        raise invalid(p.SECTION, p, "frozen_weights", f"the base computes in the model dtype "
                      f"{dtype}; use {dtype}, fp8 or nf4")


def check_fp8_machine(p: PrecisionConfig) -> None:
    """FP8 arithmetic needs a GPU that has it (compute capability 8.9+: Ada, Hopper, later);
    Transformer Engine's FP8 (`precision.fp8`) also needs TE and CUDA. torchao's FP8 storage
    (`frozen_weights: fp8`) works anywhere; its `scaled_mm` products also run on CPUs."""
    import torch  # here, not at the top: the settings import without torch

    def no_fp8_gpu(where: str, instead: str) -> None:
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            raise ConfigError(f"{where}: {torch.cuda.get_device_name()} (compute capability "
                              f"{major}.{minor}) has no FP8 arithmetic (needs 8.9+); {instead}")

    if p.frozen_weights == "fp8" and p.fp8_matmul == "scaled_mm" and torch.cuda.is_available():
        no_fp8_gpu("precision.fp8_matmul=scaled_mm", "use precision.fp8_matmul=dequantize")
    if p.fp8 is None:
        return
    where = f"precision.fp8={p.fp8}"
    instead = "use precision.frozen_weights=fp8 (torchao, no Transformer Engine) instead"
    try:
        import transformer_engine.pytorch  # noqa: F401  (optional dependency)
    except Exception as e:  # not installed, or built for another torch/CUDA
        raise ConfigError(f"{where}: Transformer Engine does not import ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); {instead}") from None
    if not torch.cuda.is_available():
        raise ConfigError(f"{where}: Transformer Engine's FP8 needs a CUDA GPU; {instead}")
    no_fp8_gpu(where, instead)
