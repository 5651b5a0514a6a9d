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

The logits' weights (output layer, tied embedding) in FP8: a few hidden dimensions carry
massive activations into the output layer (SmolLM2: one dimension's mean square is 840, the
median's 1.2), so e4m3's rounding of those few weight columns dominates the logits' error (8
of 576 columns: 85% of its variance). Their rounding residual is kept in the model dtype
(`OutlierColumns`, `precision.fp8_output_outliers` columns) and added to the logits. The
columns are picked at load from one forward pass over pseudo-random tokens (the massive
dimensions do not depend on the input) weighted by each column's rounding error.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
)
from torchao.float8.inference import Float8MMConfig
from torchao.quantization import Float8Tensor
from torchao.quantization.granularity import PerRow, PerTensor
from torchao.quantization.quantize_.workflows.float8.float8_tensor import (
    QuantizeTensorToFloat8Kwargs,
)

from pesc_megatron.model.precision import FP8_MATMULS

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


class OutlierColumns(torch.nn.Module):
    """The part of an FP8 output layer's weight that e4m3 rounds away on the hidden dimensions
    `index`, kept in high precision: `residual[v, j] = W[v, index[j]] - fp8(W)[v, index[j]]`
    for this rank's vocabulary rows. Hooked onto megatron-core's output layer, it adds
    `hidden[..., index] @ residual.T` to the logits, gathering those columns of the hidden
    state as the layer gathers all of it (over the sequence with SP; the backward reduces the
    input gradient over TP either way)."""

    def __init__(self, index: torch.Tensor, residual: torch.Tensor):
        super().__init__()
        # Not persistent: derived from the checkpoint's weight at load, never saved.
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("residual", residual, persistent=False)

    def add_to_logits(self, layer, args, kwargs, output):
        logits, bias = output
        hidden = args[0] if args else kwargs["input_"]
        columns = hidden[..., self.index]
        if layer.sequence_parallel:
            columns = gather_from_sequence_parallel_region(columns, group=layer.tp_group)
        else:
            columns = copy_to_tensor_model_parallel_region(columns, group=layer.tp_group)
        extra = columns @ self.residual.t()
        gather = kwargs.get("runtime_gather_output")
        if layer.gather_output if gather is None else gather:
            extra = gather_from_tensor_model_parallel_region(extra, group=layer.tp_group)
        return logits + extra, bias


def calibration_batch(vocab_size: int, seq_length: int) -> dict:
    """One micro-batch of pseudo-random tokens (fixed seed): enough to find the dimensions
    that carry massive activations, which do not depend on the text."""
    tokens = torch.randint(vocab_size, (1, seq_length),
                           generator=torch.Generator().manual_seed(0))
    return {"tokens": tokens, "labels": tokens.roll(-1, 1),
            # every position: the output layer sees only the loss positions (PESCGPTModel)
            "loss_mask": torch.ones(1, seq_length),
            "position_ids": torch.arange(seq_length).view(1, -1),
            "padding_mask": torch.zeros(1, seq_length, dtype=torch.bool)}


def output_hidden_mean_square(model: torch.nn.Module, forward: Callable[[], None]):
    """Runs `forward` (a collective forward pass of the whole model, every rank) and returns,
    on the ranks that hold the output layer, the mean square of each hidden dimension of its
    input (None elsewhere)."""
    layer = getattr(model, "output_layer", None)
    if layer is None:
        forward()
        return None
    sums = []

    def record(module, args):
        h = args[0].detach().float().flatten(0, -2)
        sums.append(torch.cat([h.pow(2).sum(0), h.new_tensor([h.shape[0]])]))

    handle = layer.register_forward_pre_hook(record)
    try:
        forward()
    finally:
        handle.remove()
    total = torch.stack(sums).sum(0)
    if layer.sequence_parallel and dist.is_initialized():  # each rank saw its sequence part
        dist.all_reduce(total, group=layer.tp_group)
    return total[:-1] / total[-1]


def add_outlier_columns(layer, weight: torch.Tensor, fp8: torch.Tensor,
                        hidden_ms: torch.Tensor, count: int) -> OutlierColumns:
    """Picks the `count` hidden dimensions where `fp8`'s rounding of the logits' `weight`
    costs the most (mean square of the hidden state x the column's squared rounding error,
    summed over the whole vocabulary, so that every tensor-parallel rank picks the same) and
    hooks their residual onto the output layer `layer`."""
    dequantized = fp8.dequantize().float()
    error = (weight.float() - dequantized).pow(2).sum(0)
    if dist.is_initialized():
        dist.all_reduce(error, group=layer.tp_group)
    index = (hidden_ms * error).topk(min(count, weight.shape[1])).indices.sort().values
    residual = (weight.float()[:, index] - dequantized[:, index]).to(weight.dtype)
    outliers = OutlierColumns(index, residual)
    layer.fp8_outliers = outliers
    layer.register_forward_hook(outliers.add_to_logits, with_kwargs=True)
    return outliers


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
                           output_layer: bool = False, outliers: int = 0,
                           calibrate: Optional[Callable[[], None]] = None) -> str:
    """Replaces the frozen weights of `model`'s linears and embedding (this rank's shards) by
    FP8 tensors, in place; returns the product kind used (`dequantize` or `scaled_mm`). The
    logits' weights (output layer, a tied embedding) only with `output_layer`, then with the
    `outliers` columns that matter most kept in high precision (`OutlierColumns`), found
    through `calibrate`: a forward pass of the model, which every rank must run. Without them
    e4m3's rounding of the logits costs SmolLM2 2.2% of its eval loss, against 0.8% for all the
    rest."""
    if matmul not in FP8_MATMULS:
        raise ValueError(f"fp8 matmul {matmul!r}: expected one of {', '.join(FP8_MATMULS)}")
    if matmul == "auto":
        matmul = "scaled_mm" if has_fp8_matmul() else "dequantize"
    keep = set() if output_layer else output_weights(model)
    hidden_ms = None
    if output_layer and outliers > 0 and calibrate is not None:
        hidden_ms = output_hidden_mean_square(model, calibrate)
    output = getattr(model, "output_layer", None)
    logits_weight = None  # the weight the output layer multiplies with, on its ranks
    if output is not None:
        logits_weight = (model.shared_embedding_or_output_weight()
                         if model.share_embeddings_and_output_weights else output.weight)
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
        if hidden_ms is not None and weight is logits_weight:
            add_outlier_columns(output, weight.detach(), fp8, hidden_ms, outliers)
    return matmul


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes of memory `tensor` holds: its storage, or for an FP8 tensor its data and scales."""
    inner = [getattr(tensor, name) for name in getattr(tensor, "tensor_data_names", ())]
    if inner:
        return sum(storage_bytes(t) for t in inner)
    return tensor.untyped_storage().nbytes()


def frozen_weight_bytes(model: torch.nn.Module) -> dict:
    """This rank's frozen parameters: count, resident bytes (with the FP8 output layer's
    high-precision columns), and the bytes they would take in bf16 (2 per element)."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    numel = sum(p.numel() for p in frozen)
    outliers = sum(storage_bytes(b) for m in model.modules() if isinstance(m, OutlierColumns)
                   for b in m.buffers())
    return dict(parameters=numel, bytes=sum(storage_bytes(p) for p in frozen) + outliers,
                bf16_bytes=2 * numel)


def describe_frozen(model: torch.nn.Module) -> str:
    """One line for the logs: the frozen weights' resident size against bf16."""
    b = frozen_weight_bytes(model)
    return (f"frozen weights on this rank: {b['parameters']:,} parameters, "
            f"{b['bytes'] / 2**20:.1f} MiB ({b['bytes'] / max(1, b['bf16_bytes']):.1%} of bf16)")
