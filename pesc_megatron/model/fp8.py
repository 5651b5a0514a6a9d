"""The FP8 frozen base without Transformer Engine (`precision.frozen_weights: fp8`).

After the model is loaded, the frozen weight of each megatron-core linear (attention
`linear_qkv`, `linear_proj`, the shared FFN's `linear_fc1`, `linear_fc2`) and of an untied
embedding becomes a torchao `Float8Tensor`: float8 e4m3 values with fp32 scales, half the
bytes of bf16; the logits' weights (output layer, tied embedding) only on request. Routers,
adapters, LoRA and norms are trainable or tiny and keep their dtype. megatron-core runs
frozen weights through `LinearWithFrozenWeight`, whose forward is `input @ weight.t()` and
backward `grad_output @ weight`; torchao's tensor serves both.

How the products run (`fp8_matmul`):
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
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torchao.float8.inference import Float8MMConfig
from torchao.quantization import Float8Tensor
from torchao.quantization.granularity import PerRow, PerTensor
from torchao.quantization.quantize_.workflows.float8.float8_tensor import (
    QuantizeTensorToFloat8Kwargs,
)

from pesc_megatron.config import FP8_MATMULS

# The modules whose frozen `weight` becomes FP8 (LoRA linears subclass the first two; their
# own `lora.*` layers are trainable and therefore skipped).
FP8_MODULES = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)


def has_fp8_matmul() -> bool:
    """Whether this process's GPU multiplies in FP8 (Ada/Hopper and later: sm_89+)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def to_float8(weight: torch.Tensor, matmul: str):
    """`weight` as a torchao Float8Tensor (e4m3) for products of kind `matmul`
    (`dequantize` or `scaled_mm`)."""
    if matmul == "dequantize":
        return Float8Tensor.from_hp(weight, granularity=PerRow())
    # use_fast_accum=False: Hopper's fast accumulation loses precision over long sums.
    activations = QuantizeTensorToFloat8Kwargs(granularity=PerTensor())
    return Float8Tensor.from_hp(weight, granularity=PerTensor(), act_quant_kwargs=activations,
                                mm_config=Float8MMConfig(use_fast_accum=False))


def output_weights(model: torch.nn.Module) -> set[int]:
    """ids of the weights that compute the logits: the output layer's, and the embedding's
    when the two are tied."""
    ids = set()
    output = getattr(model, "output_layer", None)
    if output is not None and output.weight is not None:
        ids.add(id(output.weight))
    if getattr(model, "share_embeddings_and_output_weights", False) and hasattr(model,
                                                                                "embedding"):
        ids.add(id(model.embedding.word_embeddings.weight))
    return ids


def convert_frozen_weights(model: torch.nn.Module, matmul: str = "auto",
                           output_layer: bool = False) -> str:
    """Replaces the frozen weights of `model`'s linears and embedding (this rank's shards) by
    FP8 tensors, in place; returns the product kind used (`dequantize` or `scaled_mm`). The
    logits' weights (output layer, a tied embedding) only with `output_layer`: e4m3's rounding
    there costs the most loss (SmolLM2: 3% of its eval loss, against 0.8% for all the rest)."""
    if matmul not in FP8_MATMULS:
        raise ValueError(f"fp8 matmul {matmul!r}: expected one of {', '.join(FP8_MATMULS)}")
    if matmul == "auto":
        matmul = "scaled_mm" if has_fp8_matmul() else "dequantize"
    keep = set() if output_layer else output_weights(model)
    converted = {}  # a weight shared by several modules is converted once
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (not isinstance(module, FP8_MODULES) or weight is None or weight.requires_grad
                or id(weight) in keep):
            continue
        if id(weight) in converted:
            module.weight = converted[id(weight)]
            continue
        kind = matmul
        # The embedding is read by row (torchao dequantizes it for the lookup); a tied output
        # layer multiplies with it as given. CUDA's _scaled_mm needs both dimensions to be
        # multiples of 16 (torchao's own configs skip other weights too).
        if isinstance(module, VocabParallelEmbedding) or any(d % 16 for d in weight.shape):
            kind = "dequantize"
        fp8 = torch.nn.Parameter(to_float8(weight.detach(), kind), requires_grad=False)
        fp8.__dict__.update(weight.__dict__)  # megatron-core's tensor-parallel attributes
        module.weight = converted[id(weight)] = fp8
    return matmul


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes of memory `tensor` holds: its storage, or for an FP8 tensor its data and scales."""
    inner = [getattr(tensor, name) for name in getattr(tensor, "tensor_data_names", ())]
    if inner:
        return sum(storage_bytes(t) for t in inner)
    return tensor.untyped_storage().nbytes()


def frozen_weight_bytes(model: torch.nn.Module) -> dict:
    """This rank's frozen parameters: count, resident bytes, and the bytes they would take in
    bf16 (2 per element)."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    numel = sum(p.numel() for p in frozen)
    return dict(parameters=numel, bytes=sum(storage_bytes(p) for p in frozen),
                bf16_bytes=2 * numel)


def describe_frozen(model: torch.nn.Module) -> str:
    """One line for the logs: the frozen weights' resident size against bf16."""
    b = frozen_weight_bytes(model)
    return (f"frozen weights on this rank: {b['parameters']:,} parameters, "
            f"{b['bytes'] / 2**20:.1f} MiB ({b['bytes'] / max(1, b['bf16_bytes']):.1%} of bf16)")
