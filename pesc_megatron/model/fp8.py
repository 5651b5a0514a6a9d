"""FP8 frozen weights without Transformer Engine (`precision.frozen_weights: fp8`; the generic
part, which weights and how they load, is in model/quantized.py): torchao `Float8Tensor`s,
float8 e4m3 values with fp32 scales, half the bytes of bf16.

How the products run (`precision.fp8_matmul`):
- `dequantize` (CPU and GPUs without FP8): one scale per output row; each product
  dequantizes the weight to the activation dtype and multiplies in high precision. This
  saves memory, not time (the dequantized copy is transient, one weight at a time).
- `scaled_mm` (GPUs with compute capability >= 8.9; runs, slowly, on CPU too): activations
  and gradients are quantized to e4m3 on the fly and both products are `torch._scaled_mm`.
  One scale per tensor, for the weight as for the activations: the backward's contraction
  runs over the weight's rows, where per-row scales cannot be factored out of the product.
- `auto`: `scaled_mm` where the GPU has FP8, else `dequantize`.
"""
from __future__ import annotations

import torch
from torchao.float8.inference import Float8MMConfig
from torchao.quantization import Float8Tensor
from torchao.quantization.granularity import PerRow, PerTensor
from torchao.quantization.quantize_.workflows.float8.float8_tensor import (
    QuantizeTensorToFloat8Kwargs,
)


CHUNK_ELEMENTS = 2**20  # values converted at a time (where the scales allow)


def has_fp8_matmul() -> bool:
    """Whether this process's GPU multiplies in FP8 (Ada/Hopper and later: sm_89+)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def to_float8(weight: torch.Tensor, matmul: str):
    """`weight` as a torchao Float8Tensor (e4m3) for products of kind `matmul`
    (`dequantize` or `scaled_mm`)."""
    if matmul == "dequantize":
        # Per-row scales: converted a few rows at a time, which bounds the conversion's
        # transient (torchao's takes ~5x the weight's bf16 bytes at once).
        rows = max(1, CHUNK_ELEMENTS // weight.shape[-1])
        chunks = [Float8Tensor.from_hp(c, granularity=PerRow()) for c in weight.split(rows)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    # use_fast_accum=False: Hopper's fast accumulation loses precision over long sums.
    activations = QuantizeTensorToFloat8Kwargs(granularity=PerTensor())
    return Float8Tensor.from_hp(weight, granularity=PerTensor(), act_quant_kwargs=activations,
                                mm_config=Float8MMConfig(use_fast_accum=False))
