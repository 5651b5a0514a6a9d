"""The low-precision frozen base (`precision.frozen_weights: fp8 | nf4`), whatever the format.

After the model is loaded, the frozen weight of each megatron-core linear (attention
`linear_qkv`, `linear_proj`, the shared FFN's `linear_fc1`, `linear_fc2`) and of an untied
embedding becomes a torchao tensor: FP8 (model/fp8.py: e4m3 values, fp32 scales, half the
bytes of bf16) or NF4 (model/nf4.py: QLoRA's 4-bit format, about a quarter); the logits'
weights (output layer, tied embedding) on request. Routers, adapters, LoRA and norms are
trainable or tiny and keep their dtype. megatron-core runs frozen weights through
`LinearWithFrozenWeight`, whose forward is `input @ weight.t()` and backward
`grad_output @ weight`; both tensors serve it.

The loader (checkpoint/base.py) converts the decoder layers' frozen weights one matrix at a
time as it loads them (`quantize_frozen` on each), so that the high-precision base shrinks as
it loads, then the rest and the logits' weights (`convert_frozen_weights`).

The logits' weights in low precision: a few hidden dimensions carry massive activations
into the output layer (SmolLM2: one dimension's mean square is 840, the median's 1.2), so
the rounding of those few weight columns dominates the logits' error (FP8: 8 of 576 columns
carry 85% of its variance). Their rounding residual is kept in the model dtype
(`OutlierColumns`, `precision.output_outliers` columns) and added to the logits. The columns
are picked from one forward pass over pseudo-random tokens (the massive dimensions do not
depend on the input), after the layers are converted, weighted by each column's rounding
error.

NF4's 4 bits are coarse enough that the same holds inside the layers: the input columns of
each linear whose rounding costs its output most (input mean square x the column's squared
rounding error; the massive dimensions again) are kept exact (`pick_exact_columns`,
`precision.linear_outliers`; model/nf4.py patches them into every product), found from one
calibration pass through the converted layers and a second read of the base
(checkpoint/base.py).
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
from torchao.quantization import Float8Tensor, NF4Tensor

from pesc_megatron.model import nf4
from pesc_megatron.model.fp8 import CHUNK_ELEMENTS, has_fp8_matmul, to_float8
from pesc_megatron.model.precision import FP8_MATMULS, LOW_PRECISION

# The modules whose frozen `weight` is converted (LoRA linears subclass the first two; their
# own `lora.*` layers are trainable and therefore skipped).
QUANTIZED_MODULES = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)


def is_quantized(tensor) -> bool:
    return isinstance(tensor, (Float8Tensor, NF4Tensor))


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """A quantized weight back in its high-precision dtype (a plain tensor as it is)."""
    if isinstance(tensor, Float8Tensor):
        return tensor.dequantize()
    return nf4.dequantize(tensor)


def dense_rows(tensor: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """`dense(tensor)[start:end]`, dequantizing those rows only."""
    if isinstance(tensor, NF4Tensor):
        return nf4.nf4_rows(tensor, torch.arange(start, min(end, tensor.shape[0])))
    if isinstance(tensor, Float8Tensor):
        return tensor[start:end].dequantize()
    return tensor[start:end]


class OutlierColumns(torch.nn.Module):
    """The part of a low-precision output layer's weight that rounding takes away on the hidden
    dimensions `index`, kept in high precision:
    `residual[v, j] = W[v, index[j]] - q(W)[v, index[j]]` for this rank's vocabulary rows. Hooked onto megatron-core's output layer, it adds
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


def calibration_batches(vocab_size: int, seq_length: int, count: int = 4) -> list[dict]:
    """`count` micro-batches of pseudo-random tokens (fixed seeds): enough to find the
    dimensions that carry massive activations, which do not depend on the text. Several short
    ones rather than one long one: the logits of one at a time are what the pass holds."""
    batches = []
    for seed in range(count):
        tokens = torch.randint(vocab_size, (1, seq_length),
                               generator=torch.Generator().manual_seed(seed))
        batches.append({"tokens": tokens, "labels": tokens.roll(-1, 1),
                        # every position: the output layer sees only the loss positions
                        "loss_mask": torch.ones(1, seq_length),
                        "position_ids": torch.arange(seq_length).view(1, -1),
                        "padding_mask": torch.zeros(1, seq_length, dtype=torch.bool)})
    return batches


def input_mean_squares(layers: dict, forward: Callable[[], None]) -> dict:
    """Runs `forward` (a collective forward pass of the whole model, every rank) and returns
    the mean square of each dimension of each of `layers`' inputs (name: module), over every
    call. A column-parallel layer under sequence parallelism sees its part of the sequence:
    its sums and counts are reduced over TP (the output layer's input, gathered before it,
    then counts TP times, sums and counts alike)."""
    sums = {name: [] for name in layers}

    def recorder(name):
        def record(module, args, kwargs):
            h = (args[0] if args else kwargs["input_"]).detach().float().flatten(0, -2)
            sums[name].append(torch.cat([h.pow(2).sum(0), h.new_tensor([h.shape[0]])]))
        return record

    handles = [m.register_forward_pre_hook(recorder(n), with_kwargs=True)
               for n, m in layers.items()]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    result = {}
    for name, layer in layers.items():
        total = torch.stack(sums[name]).sum(0)
        if (isinstance(layer, ColumnParallelLinear) and layer.sequence_parallel
                and dist.is_initialized()):
            dist.all_reduce(total, group=layer.tp_group)
        result[name] = total[:-1] / total[-1]
    return result


def output_hidden_mean_square(model: torch.nn.Module, forward: Callable[[], None]):
    """Runs `forward` (as `input_mean_squares`) and returns, on the ranks that hold the output
    layer, the mean square of each hidden dimension of its input (None elsewhere)."""
    layer = getattr(model, "output_layer", None)
    if layer is None:
        forward()
        return None
    return input_mean_squares({"output_layer": layer}, forward)["output_layer"]


def pick_exact_columns(linear: torch.nn.Module, exact: torch.Tensor, input_ms: torch.Tensor,
                       count: int) -> torch.Tensor:
    """An NF4 frozen linear keeps exact the `count` input columns of its weight where the
    rounding costs its output most: the input's mean square (`input_ms`) x the column's squared
    rounding error over this rank's rows (`exact`: this rank's weight in high precision). The
    input's massive dimensions decide; each rank picks its own, as it multiplies with its own
    shard. Returns the columns."""
    rows = max(1, CHUNK_ELEMENTS // exact.shape[1])  # no full-size temporaries
    error = sum((exact[r:r + rows].float() - dense_rows(linear.weight, r, r + rows).float())
                .pow(2).sum(0) for r in range(0, exact.shape[0], rows))
    index = (input_ms.to(error.device) * error).topk(min(count, error.numel())).indices
    index = index.sort().values
    nf4.keep_exact_columns(linear.weight, index, exact[:, index].to(linear.weight.dtype))
    return index


def add_outlier_columns(layer, weight: torch.Tensor, quantized: torch.Tensor,
                        hidden_ms: torch.Tensor, count: int) -> OutlierColumns:
    """Picks the `count` hidden dimensions where `quantized`'s rounding of the logits' `weight`
    costs the most (mean square of the hidden state x the column's squared rounding error,
    summed over the whole vocabulary, so that every tensor-parallel rank picks the same) and
    hooks their residual onto the output layer `layer`."""
    rows = max(1, CHUNK_ELEMENTS // weight.shape[1])  # a few rows at a time: the table is big
    error = sum((weight[r:r + rows].float() - dense_rows(quantized, r, r + rows).float()).pow(2)
                .sum(0) for r in range(0, weight.shape[0], rows))
    if dist.is_initialized():
        dist.all_reduce(error, group=layer.tp_group)
    index = (hidden_ms * error).topk(min(count, weight.shape[1])).indices.sort().values
    residual = torch.cat([(weight[r:r + rows].float()[:, index]
                           - dense_rows(quantized, r, r + rows).float()[:, index])
                          for r in range(0, weight.shape[0], rows)]).to(weight.dtype)
    outliers = OutlierColumns(index, residual)
    layer.outlier_columns = outliers
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


def resolve_matmul(frozen_weights: str, matmul: str) -> str:
    """The products' kind: `dequantize` or `scaled_mm` for FP8 (`auto`: `scaled_mm` where the
    GPU has FP8 arithmetic), always `dequantize` for NF4."""
    if matmul not in FP8_MATMULS:
        raise ValueError(f"fp8 matmul {matmul!r}: expected one of {', '.join(FP8_MATMULS)}")
    if frozen_weights == "nf4":
        return "dequantize"
    if matmul == "auto":
        return "scaled_mm" if has_fp8_matmul() else "dequantize"
    return matmul


def quantize_weight(module: torch.nn.Module, name: str, frozen_weights: str,
                    matmul: str) -> torch.nn.Parameter:
    """`module.weight` (frozen, high precision) as a frozen parameter in `frozen_weights`."""
    weight = module.weight.detach()
    if frozen_weights == "nf4":
        quantized = nf4.to_nf4(weight, f"{name}.weight")
    else:
        # The embedding is read by row (torchao dequantizes it for the lookup); a tied output
        # layer multiplies with it as given. CUDA's _scaled_mm needs both dimensions to be
        # multiples of 16 (torchao's own configs skip other weights too).
        if isinstance(module, VocabParallelEmbedding) or any(d % 16 for d in weight.shape):
            matmul = "dequantize"
        quantized = to_float8(weight, matmul)
    param = torch.nn.Parameter(quantized, requires_grad=False)
    param.__dict__.update(module.weight.__dict__)  # megatron-core's tensor-parallel attributes
    return param


def quantize_frozen(root: torch.nn.Module, frozen_weights: str, matmul: str,
                    keep: frozenset[int] = frozenset(), prefix: str = "") -> None:
    """Converts, in place, the frozen weights of the linears and embeddings in `root` (this
    rank's shards) that are not converted yet, except those whose id is in `keep`. `matmul`
    comes from `resolve_matmul`. A weight shared by several modules is converted once."""
    converted = {}
    for name, module in root.named_modules(prefix=prefix):
        weight = getattr(module, "weight", None)
        if (not isinstance(module, QUANTIZED_MODULES) or weight is None or weight.requires_grad
                or is_quantized(weight) or id(weight) in keep):
            continue
        if id(weight) not in converted:
            converted[id(weight)] = quantize_weight(module, name, frozen_weights, matmul)
        module.weight = converted[id(weight)]


def quantize_logits_weights(model: torch.nn.Module, frozen_weights: str, matmul: str,
                            outliers: int = 0,
                            calibrate: Optional[Callable[[], None]] = None) -> None:
    """Converts the logits' weights (the output layer's, or the embedding tied to it) with
    the `outliers` columns that matter most kept in high precision (`OutlierColumns`), found
    through `calibrate`: a forward pass of the model, which every rank must run."""
    hidden_ms = None
    if outliers > 0 and calibrate is not None:
        hidden_ms = output_hidden_mean_square(model, calibrate)
    high_precision = logits_weight(model)
    quantize_frozen(model, frozen_weights, matmul)
    if hidden_ms is not None and high_precision is not None:
        add_outlier_columns(model.output_layer, high_precision.detach(), logits_weight(model),
                            hidden_ms, outliers)


def logits_weight(model: torch.nn.Module) -> Optional[torch.Tensor]:
    """The weight the output layer multiplies with (None on ranks without it)."""
    output = getattr(model, "output_layer", None)
    if output is None:
        return None
    return (model.shared_embedding_or_output_weight()
            if model.share_embeddings_and_output_weights else output.weight)


def convert_frozen_weights(model: torch.nn.Module, frozen_weights: str = "fp8",
                           matmul: str = "auto", output_layer: bool = False,
                           outliers: int = 0,
                           calibrate: Optional[Callable[[], None]] = None) -> str:
    """Replaces the frozen weights of `model`'s linears and embedding (this rank's shards) by
    `frozen_weights` (fp8 or nf4) tensors, in place; returns the product kind used
    (`dequantize` or `scaled_mm`). The logits' weights (output layer, a tied embedding) only
    with `output_layer`, after the rest and then with `outliers` columns in high precision
    (`quantize_logits_weights`). Without them e4m3's rounding of the logits costs SmolLM2 2.2%
    of its eval loss, against 0.8% for all the rest."""
    if frozen_weights not in LOW_PRECISION:
        raise ValueError(f"frozen weights {frozen_weights!r}: expected one of "
                         f"{', '.join(LOW_PRECISION)}")
    matmul = resolve_matmul(frozen_weights, matmul)
    quantize_frozen(model, frozen_weights, matmul, keep=frozenset(output_weights(model)))
    if output_layer:
        quantize_logits_weights(model, frozen_weights, matmul, outliers, calibrate)
    return matmul


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes of memory `tensor` holds: its storage, or for a quantized tensor its parts (data,
    scales and, for NF4, its 16 levels)."""
    if is_quantized(tensor):
        return (sum(storage_bytes(getattr(tensor, name))
                    for name in tensor.__tensor_flatten__()[0])
                + sum(storage_bytes(t) for t in nf4.exact_columns(tensor) or ()))
    return tensor.untyped_storage().nbytes()


def frozen_weight_bytes(model: torch.nn.Module) -> dict:
    """This rank's frozen parameters: count, resident bytes (with the high-precision columns
    of the low-precision output layer and NF4 linears), and the bytes they would take in bf16
    (2 per element)."""
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
