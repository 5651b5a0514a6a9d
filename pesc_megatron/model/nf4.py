"""The NF4 frozen base (`precision.frozen_weights: nf4`): QLoRA's 4-bit NormalFloat format
through torchao's `NF4Tensor`, which runs on CPUs and GPUs (bitsandbytes does not run here).

The format, as QLoRA's `bnb_4bit_quant_type="nf4"` with `bnb_4bit_use_double_quant=True`:
the flattened weight is cut into blocks of 64 values; each value is stored as the index (4
bits) of the nearest of 16 NormalFloat levels in [-1, 1] times its block's absmax; the absmaxes
are double-quantized (their mean removed, then int8 with one scale per group of up to 256
blocks). About 4.13 bits per weight: 0.5 byte, plus 1 byte per 64 values, plus a scale per
group. Products dequantize the weight to the model dtype and multiply in it (as QLoRA does
with its compute dtype).

torchao 0.18's tensor serves `F.linear` (torchtune's path) but not megatron-core's frozen-weight
linear (`input @ weight.t()` forward, `grad @ weight` backward) or embedding; three fixes,
made here and nowhere else (`register_nf4_ops`), as entries of torchao's NF4 op table:
- `aten.t` swaps the strides but keeps the shape: it now returns the transposed shape.
- `aten.mm` with an NF4 operand multiplies by the transpose of what it was given, whatever
  its layout: replaced by a dequantizing `mm` that reads the layout.
- `aten.embedding` is not implemented: added, dequantizing only the looked-up rows.
`tests/model/test_nf4.py` checks each against the dequantized weight.

A few input columns of a weight can be kept exact (`keep_exact_columns`): `dequantize`, hence
every product, then uses their high-precision values (`precision.linear_outliers`, chosen in
model/quantized.py).
"""
from __future__ import annotations

import torch
from torchao.quantization import NF4Tensor
from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

from pesc_megatron.model.precision import NF4_BLOCK_SIZE as BLOCK_SIZE
from pesc_megatron.model.precision import scaler_block_size
from pesc_megatron.schema import ConfigError

CHUNK_ELEMENTS = 2**18  # values quantized at a time (a multiple of BLOCK_SIZE)


def check_nf4_shape(shape: tuple[int, ...], name: str) -> None:
    """One line naming the weight when NF4 cannot store this rank's shard of it."""
    numel = 1
    for d in shape:
        numel *= d
    if numel % BLOCK_SIZE or shape[-1] % 2:
        raise ConfigError(f"precision.frozen_weights=nf4: {name} has a shard of shape "
                          f"{list(shape)} on this rank, {numel} values, which the NF4 block "
                          f"size {BLOCK_SIZE} does not divide; choose another tensor-parallel "
                          "size or keep this base in fp8")


def to_nf4(weight: torch.Tensor, name: str = "weight") -> NF4Tensor:
    """`weight` (2-D) as an NF4 tensor in `weight`'s dtype: what torchao's
    `NF4Tensor.from_tensor` makes (its own functions, the same values), but a chunk of
    `CHUNK_ELEMENTS` at a time, where `from_tensor` holds several full-size temporaries (about
    5x the weight's bf16 bytes for SmolLM2's embedding)."""
    check_nf4_shape(tuple(weight.shape), name)
    weight = weight.detach().contiguous()
    flat = weight.view(-1)
    chunks = flat.split(CHUNK_ELEMENTS)  # a multiple of the block size: blocks stay whole
    absmax = torch.cat([nf4_tensor.get_block_absmax(c, BLOCK_SIZE) for c in chunks])
    groups = scaler_block_size(flat.numel())
    # The absmaxes' double quantization, as from_tensor does it: on blocks of size 1 of the
    # absmaxes themselves, their absmax is themselves.
    scalers, factor, mean = NF4Tensor.double_quantize_scalers(absmax, 1, groups)
    factor = factor.clone()  # with one group it views a whole group's expanded row
    levels = nf4_levels(weight.dtype, weight.device)
    packed = torch.cat([NF4Tensor.convert_to_norm_float_weight(c, c.numel() // BLOCK_SIZE,
                                                                BLOCK_SIZE, levels)
                        for c in chunks])
    meta = nf4_tensor.SubclassTensorArgs(weight.shape, weight.stride(), 0, weight.dtype,
                                         weight.device, False)
    return NF4Tensor(meta, BLOCK_SIZE, absmax.numel(), groups, scalers, factor, mean, packed,
                     levels)


def nf4_levels(dtype: torch.dtype, device) -> torch.Tensor:
    """NF4's 16 levels in `dtype`, as torchao defines them."""
    return NF4Tensor.from_tensor(torch.zeros(BLOCK_SIZE, dtype=dtype, device=device),
                                 BLOCK_SIZE, 1).nf4


def keep_exact_columns(weight: NF4Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """Makes `dequantize(weight)`, and so every product with it, exact on the input columns
    `index`: `values` is `W[:, index]` in high precision. An attribute of this tensor object,
    which megatron-core's frozen linear passes on to its products (its transposes too, `_t`);
    not saved: the loader derives it from the checkpoint. Other ops that build a new tensor
    (`.to(device)`, `clone`, slicing) drop them: nothing here uses them on a frozen weight."""
    weight.exact_columns = (index, values)


def exact_columns(t: torch.Tensor):
    """(index, values) of `keep_exact_columns`, or None."""
    return getattr(t, "exact_columns", None)


def dequantize(t: torch.Tensor) -> torch.Tensor:
    """A dense copy of `t` in its dtype, with its exact columns; `t` may be a transposed view
    of an NF4 tensor. The same values as torchao's `get_original_weight`, 1.6-3x faster on
    CPU (one table lookup per byte instead of two code extractions, two lookups and an
    interleaving copy); every product runs it."""
    if not isinstance(t, NF4Tensor):
        return t
    if not t.is_contiguous():
        return dequantize(t.t()).t()
    absmax = t.dequantize_scalers(t.quantized_scalers, t.quantization_factor,
                                  t.scaler_block_size)
    dense = decode(t, t.quantized_data, absmax).view(t.shape)
    columns = exact_columns(t)
    if columns is not None:
        dense.index_copy_(1, *columns)
    return dense


def decode(weight: NF4Tensor, packed: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """The values of `packed` (bytes of two codes each, a whole number of blocks in its last
    dimension), each code's level times its block's absmax (`absmax`: one per block)."""
    byte = torch.arange(256, device=packed.device)
    pairs = torch.stack([weight.nf4[byte >> 4], weight.nf4[byte & 0b1111]], dim=-1)
    values = torch.nn.functional.embedding(packed.int(), pairs).flatten(-2)
    return (values.unflatten(-1, (-1, weight.block_size)) * absmax.unsqueeze(-1)).flatten(-2)


def nf4_rows(weight: NF4Tensor, index: torch.Tensor) -> torch.Tensor:
    """`dequantize(weight)[index]` without the rest of the table: the rows' codes and their
    blocks' absmaxes only. Needs rows made of whole blocks (every hidden size is a multiple
    of 64), else dequantizes the table."""
    rows, cols = weight.shape
    if cols % weight.block_size:
        return dequantize(weight)[index]
    absmax = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor,
                                       weight.scaler_block_size).view(rows, -1)[index]
    dense = decode(weight, weight.quantized_data.view(rows, cols // 2)[index], absmax)
    columns = exact_columns(weight)
    if columns is not None:
        dense[..., columns[0]] = columns[1][index]
    return dense


def _t(func, args, kwargs=None):
    a = args[0]
    meta = nf4_tensor.SubclassTensorArgs(
        (a.size(1), a.size(0)), (a.stride(1), a.stride(0)), a.storage_offset(), a.dtype,
        a.device, a.requires_grad)
    return _carry_columns(a, NF4Tensor(meta, a.block_size, a.n_blocks, a.scaler_block_size,
                                       a.quantized_scalers, a.quantization_factor,
                                       a.scaler_mean, a.quantized_data, a.nf4))


def _detach(func, args, kwargs=None):
    return _carry_columns(args[0], _torchao_detach(func, args, kwargs))


def _carry_columns(source: NF4Tensor, made: NF4Tensor) -> NF4Tensor:
    """`made` (a view of `source`) with `source`'s exact columns."""
    if exact_columns(source) is not None:
        keep_exact_columns(made, *exact_columns(source))
    return made


def _mm(func, args, kwargs=None):
    a, b = args
    return torch.mm(dequantize(a), dequantize(b))


def _embedding(func, args, kwargs=None):
    weight, index = args[0], args[1]
    return nf4_rows(weight, index)


_torchao_detach = nf4_tensor.NF4_OPS_TABLE[torch.ops.aten.detach.default]


def register_nf4_ops() -> None:
    """The three fixes to torchao's NF4 op table (module docstring), and `detach` carrying the
    exact columns (`p.detach()`, `p.data`); idempotent."""
    nf4_tensor.NF4_OPS_TABLE[torch.ops.aten.detach.default] = _detach
    nf4_tensor.NF4_OPS_TABLE[torch.ops.aten.t.default] = _t
    nf4_tensor.NF4_OPS_TABLE[torch.ops.aten.mm.default] = _mm
    nf4_tensor.NF4_OPS_TABLE[torch.ops.aten.embedding.default] = _embedding


register_nf4_ops()
