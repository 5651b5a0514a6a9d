"""The low-precision frozen linears against float64 products; shared by the single-rank unit
tests and the TP=2 gloo test (they run on any tensor-parallel size). FP8: within the error
e4m3 allows. NF4: equal to the product with the dequantized weight (this rank's shard, as it
was quantized) within fp32 rounding.

The bound. A value v scaled by s into e4m3 (3 mantissa bits, smallest normal 2^-6, subnormal
spacing 2^-9) comes back as s * round(v / s) with |error| <= max(2^-4 |v|, 2^-10 s): half a
unit in the last place, relative for normal numbers, absolute for subnormal ones. torchao's
scale is amax / 448 over a row (weight-only) or over the tensor (`scaled_mm`, which quantizes
the activations and gradients as well); a shard's amax is at most the full tensor's, so the
full tensor's scale bounds every shard's. For a product a @ b with errors da, db per element:

    |a @ b - (a + ea) @ (b + eb)| <= |a| @ db + da @ |b| + da @ db  (+ fp32 accumulation)

and the fp32 arithmetic (quantize, dequantize, accumulate over n terms) adds at most
n * 2^-22 * (|a| @ |b|) (n * 2^-24 per accumulation, with room for the rest).
"""
from __future__ import annotations

import os

import torch

E4M3_MAX = 448.0
HIDDEN, FFN, SEQ, BATCH = 32, 64, 8, 2


def rounding(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest |error| of each element of t when stored in e4m3 with scale(s) `scale`."""
    return torch.maximum(t.abs() * 2.0**-4, scale * 2.0**-10)


def product_bound(a, b, da, db) -> torch.Tensor:
    n = a.shape[-1]
    return (a.abs() @ db + da @ b.abs() + da @ db + n * 2.0**-22 * (a.abs() @ b.abs()))


def quantized(t: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """Element error bound of t's e4m3 rounding (rows of the last dim, or the whole tensor)."""
    amax = t.abs().amax(dim=-1, keepdim=True) if rowwise else t.abs().amax()
    return rounding(t, amax / E4M3_MAX)


def tiny_model(hidden: int, lora: bool = False):
    """A two-layer PESC model (tied embedding and output layer) with random trainable weights,
    in one process."""
    from pesc_megatron.model.builder import build_model
    from pesc_megatron.model.config import LoRAConfig, ModelConfig, PESCConfig
    from pesc_megatron.parallel.config import ParallelConfig

    model = build_model(
        ModelConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                    tie_word_embeddings=True),
        PESCConfig(num_experts=4, topk=2, adapter_dim=16, adapter_dropout=0.0),
        ParallelConfig(),
        lora=LoRAConfig(targets=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                        rank=4, dropout=0.0) if lora else None)
    torch.manual_seed(5)
    with torch.no_grad():  # non-zero adapters and LoRA B, so that every gradient is exercised
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model


def make_linear(kind: str, config):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if kind == "column":
        return ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=config.init_method,
                                    bias=False, gather_output=False, skip_bias_add=True)
    return RowParallelLinear(FFN, HIDDEN, config=config, init_method=config.init_method,
                             bias=False, input_is_parallel=True, skip_bias_add=True)


def linear_config():
    """(TP size, TP rank, megatron-core's TransformerConfig) for the linears checked here."""
    from megatron.core import parallel_state as ps

    from pesc_megatron.model.builder import transformer_config
    from pesc_megatron.model.config import ModelConfig, PESCConfig
    from pesc_megatron.parallel.config import ParallelConfig

    tp = ps.get_tensor_model_parallel_world_size()
    config = transformer_config(
        ModelConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=4),
        PESCConfig(num_experts=2, topk=2, adapter_dim=8), ParallelConfig(tp=tp))
    return tp, ps.get_tensor_model_parallel_rank(), config


def linear_data(in_f: int, out_f: int, seed: int):
    """A weight whose rows have very different magnitudes, an input and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * torch.logspace(-3, 0, out_f).unsqueeze(1)
    return (w, torch.randn(SEQ, BATCH, in_f, generator=g),
            torch.randn(SEQ, BATCH, out_f, generator=g))


def check_frozen_linear(kind: str, matmul: str) -> dict:
    """Builds megatron-core's column- or row-parallel linear at the current TP size (sequence
    parallel when TP > 1, as PESC runs), gives it a frozen FP8 weight and checks the forward
    and the backward to the input against float64 within the bound. Returns the largest
    |error| / bound seen."""
    from pesc_megatron.model.quantized import convert_frozen_weights

    tp, rank, config = linear_config()
    in_f, out_f = (HIDDEN, FFN) if kind == "column" else (FFN, HIDDEN)
    w, x, grad = linear_data(in_f, out_f, seed=3)
    w[:, :3] *= 1e-4  # and elements small enough to be e4m3 subnormals

    linear = make_linear(kind, config)
    rows, cols = slice(None), slice(None)
    if kind == "column":
        rows = slice(rank * out_f // tp, (rank + 1) * out_f // tp)
    else:
        cols = slice(rank * in_f // tp, (rank + 1) * in_f // tp)
    seq = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp)  # sequence-parallel shard
    with torch.no_grad():
        linear.weight.copy_(w[rows, cols])
    linear.weight.requires_grad_(False)
    assert convert_frozen_weights(linear, "fp8", matmul) == matmul
    assert linear.weight.qdata.dtype == torch.float8_e4m3fn

    every = slice(None)
    if kind == "column":  # input: a sequence shard; output: all positions, an output shard
        inp, grad_out = x[seq], grad[..., rows]
        out_index, in_grad_index = (every, every, rows), (seq, every, every)
    else:  # input: a hidden shard; output: reduce-scattered over the sequence
        inp, grad_out = x[..., cols], grad[seq]
        out_index, in_grad_index = (seq, every, every), (every, every, cols)
    inp = inp.clone().requires_grad_(True)
    out, _ = linear(inp)
    out.backward(grad_out)

    x64, w64, g64 = x.double(), w.double(), grad.double()
    rowwise = matmul == "dequantize"
    dw = quantized(w64, rowwise)
    dx = torch.zeros_like(x64) if rowwise else quantized(x64, rowwise=False)
    dg = torch.zeros_like(g64) if rowwise else quantized(g64, rowwise=False)
    want_out, bound_out = x64 @ w64.t(), product_bound(x64, w64.t(), dx, dw.t())
    want_in, bound_in = g64 @ w64, product_bound(g64, w64, dg, dw)
    ratios = {}
    for name, got, want, bound, index in (
            ("forward", out, want_out, bound_out, out_index),
            ("backward", inp.grad, want_in, bound_in, in_grad_index)):
        err = (got.double() - want[index]).abs()
        assert (err <= bound[index]).all(), (name, kind, matmul, (err / bound[index]).max())
        ratios[name] = (err / bound[index]).max().item()
    return ratios


def check_output_outliers(count: int = 4) -> None:
    """megatron-core's output layer (column-parallel over the vocabulary, sequence parallel at
    TP > 1) with an FP8 weight whose `count` costliest hidden columns keep their residual:
    one hidden dimension carries a massive activation and must be among them; every rank
    picks the same columns; forward and input gradient equal the float64 product with the
    effective weight (FP8 rows, exact on the kept columns); and the logits' error is a fraction
    of the plain FP8 layer's."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from pesc_megatron.model.fp8 import to_float8
    from pesc_megatron.model.quantized import add_outlier_columns, output_hidden_mean_square

    tp, rank, config = linear_config()
    vocab, massive = 4 * FFN, 5
    g = torch.Generator().manual_seed(4)
    w = torch.randn(vocab, HIDDEN, generator=g)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    x[..., massive] *= 40
    grad = torch.randn(SEQ, BATCH, vocab, generator=g)
    rows = slice(rank * vocab // tp, (rank + 1) * vocab // tp)
    seq = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp)

    layer = ColumnParallelLinear(HIDDEN, vocab, config=config, init_method=config.init_method,
                                 bias=False, gather_output=False)
    holder = torch.nn.Module()
    holder.output_layer = layer
    with torch.no_grad():
        layer.weight.copy_(w[rows])
    hidden_ms = output_hidden_mean_square(holder, lambda: layer(x[seq]))
    torch.testing.assert_close(hidden_ms, x.pow(2).mean((0, 1)))
    fp8 = to_float8(w[rows], "dequantize")
    layer.weight = torch.nn.Parameter(fp8, requires_grad=False)
    outliers = add_outlier_columns(layer, w[rows], fp8, hidden_ms, count)
    index = outliers.index
    assert massive in index.tolist() and len(index) == count
    if tp > 1:
        every = [torch.empty_like(index) for _ in range(tp)]
        dist.all_gather(every, index, group=ps.get_tensor_model_parallel_group())
        assert all(torch.equal(i, index) for i in every)

    inp = x[seq].clone().requires_grad_(True)
    out, _ = layer(inp)
    out.backward(grad[..., rows])

    dequantized = to_float8(w, "dequantize").dequantize().double()  # per-row scales: any TP
    effective = dequantized.clone()
    effective[:, index] = w.double()[:, index]
    x64, g64 = x.double(), grad.double()
    exact = (x64 @ w.double().t())[..., rows]
    scale = (x64.abs() @ w.double().abs().t())[..., rows]
    assert ((out.double() - (x64 @ effective.t())[..., rows]).abs() <= 1e-6 * scale).all()
    want_grad = (g64[..., rows] @ effective[rows])
    if tp > 1:  # each rank's share of the gradient, summed over the vocabulary shards
        dist.all_reduce(want_grad, group=ps.get_tensor_model_parallel_group())
    grad_scale = g64.abs() @ w.double().abs()
    assert ((inp.grad.double() - want_grad[seq]).abs() <= 1e-6 * grad_scale[seq]).all()
    plain = ((x64 @ dequantized.t())[..., rows] - exact).abs().max()
    assert (out.double() - exact).abs().max() < 0.25 * plain, (out - exact).abs().max() / plain


def check_nf4_linear(kind: str, keep: int = 0) -> dict:
    """megatron-core's column- or row-parallel linear at the current TP size (sequence parallel
    when TP > 1) with a frozen NF4 weight: forward and input gradient equal the float64
    products with the dequantized weight within fp32 rounding (n 2^-22 |a| @ |b|). With `keep`,
    the weight keeps that many input columns exact (`pick_exact_columns`, from the input's
    mean squares measured on the layer itself, one input dimension massive): each rank's
    product uses its shard's exact columns and the massive dimension is among them. Returns
    the largest |error| / that bound."""
    from types import SimpleNamespace

    from pesc_megatron.model.nf4 import dequantize, to_nf4
    from pesc_megatron.model.quantized import (
        convert_frozen_weights,
        input_mean_squares,
        pick_exact_columns,
    )

    tp, rank, config = linear_config()
    in_f, out_f = (HIDDEN, FFN) if kind == "column" else (FFN, HIDDEN)
    w, x, grad = linear_data(in_f, out_f, seed=7)
    massive = 2 * in_f // 3  # on the last rank's input shard for the row-parallel layer
    x[..., massive] *= 30
    split = 0 if kind == "column" else 1
    shards = w.chunk(tp, dim=split)  # every rank quantizes its own shard
    shard_ms = x.pow(2).mean((0, 1)).chunk(tp if kind == "row" else 1)

    def effective(i):  # shard i as its rank multiplies with it
        holder = SimpleNamespace(weight=to_nf4(shards[i]))
        if keep:
            pick_exact_columns(holder, shards[i], shard_ms[i if kind == "row" else 0], keep)
        return dequantize(holder.weight)

    dequantized = torch.cat([effective(i) for i in range(tp)], dim=split).double()

    linear = make_linear(kind, config)
    with torch.no_grad():
        linear.weight.copy_(shards[rank])
    linear.weight.requires_grad_(False)
    convert_frozen_weights(linear, "nf4")
    assert type(linear.weight).__name__ == "NF4Tensor"
    seq = slice(rank * SEQ // tp, (rank + 1) * SEQ // tp)
    rows = slice(rank * out_f // tp, (rank + 1) * out_f // tp)
    cols = slice(rank * in_f // tp, (rank + 1) * in_f // tp)
    every = slice(None)
    if kind == "column":
        inp, grad_out = x[seq], grad[..., rows]
        out_index, in_grad_index = (every, every, rows), (seq, every, every)
    else:
        inp, grad_out = x[..., cols], grad[seq]
        out_index, in_grad_index = (seq, every, every), (every, every, cols)
    if keep:
        # What the loader does: the mean squares from a pass through the layer (the
        # sequence-parallel column layer sees its part of the sequence), then the columns.
        with torch.no_grad():
            input_ms = input_mean_squares({"linear": linear}, lambda: linear(inp))["linear"]
        torch.testing.assert_close(input_ms, shard_ms[rank if kind == "row" else 0])
        index = pick_exact_columns(linear, shards[rank], input_ms, keep)
        local = massive - cols.start if kind == "row" else massive
        assert len(index) == keep
        assert local in index.tolist() or not 0 <= local < inp.shape[-1], index
    inp = inp.clone().requires_grad_(True)
    out, _ = linear(inp)
    out.backward(grad_out)

    x64, g64 = x.double(), grad.double()
    ratios = {}
    for name, got, want, scale, n, index in (
            ("forward", out, x64 @ dequantized.t(), x64.abs() @ dequantized.abs().t(), in_f,
             out_index),
            ("backward", inp.grad, g64 @ dequantized, g64.abs() @ dequantized.abs(), out_f,
             in_grad_index)):
        bound = n * 2.0**-22 * scale[index] + 1e-30
        err = (got.double() - want[index]).abs()
        assert (err <= bound).all(), (name, kind, (err / bound).max())
        ratios[name] = (err / bound).max().item()
    # And NF4's own rounding is far above that: the product is not the high-precision one.
    exact = (x64 @ w.double().t())[out_index]
    assert (out.double() - exact).abs().max() > 1e-3
    if keep:  # but the exact columns take away most of the massive dimension's share
        plain = torch.cat([dequantize(to_nf4(s)) for s in shards], dim=split).double()
        assert (out.double() - exact).abs().max() < (x64 @ plain.t() - x64 @ w.double().t())[
            out_index].abs().max()
    return ratios


def check_loaded_exact_columns(ckpt: str, count: int = 4) -> None:
    """`precision.linear_outliers` through the loader at the current parallel layout: every
    frozen NF4 linear of the layers multiplies with the base checkpoint's own values (this
    rank's shard, read a second time) on its `count` kept columns; nothing else keeps any."""
    from megatron.core import parallel_state as ps
    from torchao.quantization import NF4Tensor

    from pesc_megatron.checkpoint.base import load
    from pesc_megatron.model.nf4 import dequantize, exact_columns
    from pesc_megatron.model.precision import PrecisionConfig
    from pesc_megatron.parallel.config import ParallelConfig

    parallel = ParallelConfig(tp=ps.get_tensor_model_parallel_world_size(),
                              pp=ps.get_pipeline_model_parallel_world_size())
    high = dict(load(ckpt, parallel)[0].named_modules())
    model, _ = load(ckpt, parallel,
                    precision=PrecisionConfig(frozen_weights="nf4", linear_outliers=count))
    kept = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, NF4Tensor):
            continue
        if not name.startswith("decoder.layers."):
            assert exact_columns(weight) is None, name
            continue
        index, values = exact_columns(weight)
        want = high[name].weight.detach()
        assert len(index) == count and torch.equal(values, want[:, index]), name
        assert torch.equal(dequantize(weight)[:, index], want[:, index]), name
        kept += 1
    layers = sum(1 for n, _ in model.named_modules() if n.count(".") == 2
                 and n.startswith("decoder.layers."))
    assert layers and kept == 4 * layers, (kept, layers)  # qkv, proj, fc1, fc2 of each


def loaded_exact_columns_worker(ckpt: str) -> None:
    """`check_loaded_exact_columns` at TP=2 (+ SP), then at PP=2 (global layer offsets)."""
    from pesc_megatron.parallel.config import ParallelConfig
    from pesc_megatron.parallel.distributed import destroy, initialize

    world = int(os.environ["WORLD_SIZE"])
    try:
        for layout in (dict(tp=world), dict(pp=world)):  # the second re-makes the groups
            initialize(ParallelConfig(**layout))
            check_loaded_exact_columns(ckpt)
    finally:
        destroy()


def tp_worker() -> None:
    """In each spawned rank: both linears, both FP8 product kinds and NF4, at this world's TP
    size."""
    from pesc_megatron.parallel.config import ParallelConfig
    from pesc_megatron.parallel.distributed import destroy, initialize

    initialize(ParallelConfig(tp=int(os.environ["WORLD_SIZE"])))
    try:
        for kind in ("column", "row"):
            for matmul in ("dequantize", "scaled_mm"):
                check_frozen_linear(kind, matmul)
            check_nf4_linear(kind)
            check_nf4_linear(kind, keep=3)
        check_output_outliers()
    finally:
        destroy()
