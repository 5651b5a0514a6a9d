"""LoRA on the frozen base's projections, as PEFT applies it to the Hugging Face model:

    y = W x + (alpha / r) * B A dropout(x)      (A: r x in, B: out x r, B = 0 at init)

megatron-core fuses q/k/v into `linear_qkv` and gate/up into the shared FFN's `linear_fc1`; each
Hugging Face projection still gets its own A and B, so that merging gives exactly what PEFT would
(and the paper's parameter count). Tensor parallelism follows the base weight's split, and all
communication is on the rank-r activations:

- column-parallel base (qkv, fc1): A is replicated and reads this rank's sequence shard; the
  r-wide result is gathered over the sequence, and B is split on its output like the base.
  A's gradient covers only the local tokens and is summed over TP by megatron-core's
  finalize_model_grads (the `sequence_parallel` attribute, as for the norms).
- row-parallel base (proj, fc2): A is split on its input like the base; its r-wide output is
  reduced as the base's (reduce-scattered with sequence parallelism), and B is replicated
  (gradient summed over TP likewise).
"""
from __future__ import annotations

import copy
import math

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule

from pesc_megatron.model.config import COLUMN_PARALLEL_LINEARS, LINEAR_TARGETS
from pesc_megatron.model.pesc_layer import dropout_mask


class _DroppedA(torch.autograd.Function):
    """The A products of the parts that read one input x, each part over its own dropout mask:
    cat_p((x * m_p) @ A_p^T). Autograd through `x * m_p` and a linear would keep each part's
    dropped copy of x for A's gradient (4 bytes an element, three for q, k, v); this keeps x
    once and the 1-byte masks, and forms each copy again in backward (time neutral on CPU:
    docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, x, masks, *weights):
        ctx.save_for_backward(x, *masks, *weights)
        hs = [torch.matmul(x * m, w.t()) for m, w in zip(masks, weights)]
        return hs[0] if len(hs) == 1 else torch.cat(hs, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        x, *rest = ctx.saved_tensors
        n = len(rest) // 2
        x2 = x.reshape(-1, x.shape[-1])
        grads = grad.reshape(-1, grad.shape[-1]).split([w.shape[0] for w in rest[n:]], dim=-1)
        dx, dws = None, []
        for i, (m, w, g) in enumerate(zip(rest[:n], rest[n:], grads)):
            m2 = m.reshape(x2.shape).to(x.dtype)  # once: a uint8 operand is cast per product
            dws.append(g.t() @ (x2 * m2) if ctx.needs_input_grad[2 + i] else None)
            if ctx.needs_input_grad[0]:
                gx = (g @ w).mul_(m2)
                dx = gx if dx is None else dx.add_(gx)
        return (None if dx is None else dx.view(x.shape)), None, *dws


class _AddB(torch.autograd.Function):
    """out + each part's B product h_p @ B_p^T, added into the part's columns of out, which is
    viewed as [tokens, groups, width] (qkv: per query group q, k, v; otherwise one group).
    Writing into the base's output in place saves building the parts' outputs side by side
    (a `cat`, with zeros for untargeted parts) and a separate add over the fused width; a view
    (as a row-parallel output at TP = 1 is) is copied first, since autograd forbids changing
    it in place."""

    @staticmethod
    def forward(ctx, out, groups, offsets, h, *weights):
        ctx.groups, ctx.offsets = groups, offsets
        ctx.save_for_backward(h, *weights)
        inplace = out._base is None
        result = out if inplace else out.clone()
        tokens = result.view(-1, groups, result.shape[-1] // groups)
        for hp, w, offset in zip(h.reshape(-1, h.shape[-1]).chunk(len(weights), dim=-1),
                                 weights, offsets):
            width = w.shape[0] // groups
            if groups == 1:
                tokens[:, 0, offset:offset + width].addmm_(hp, w.t())
            else:
                tokens[:, :, offset:offset + width].add_((hp @ w.t()).view(-1, groups, width))
        if inplace:
            ctx.mark_dirty(result)
        return result

    @staticmethod
    def backward(ctx, grad):
        h, *weights = ctx.saved_tensors
        groups = ctx.groups
        tokens = grad.view(-1, groups, grad.shape[-1] // groups)
        dh, dws = [], []
        for i, (hp, w, offset) in enumerate(zip(
                h.reshape(-1, h.shape[-1]).chunk(len(weights), dim=-1), weights, ctx.offsets)):
            width = w.shape[0] // groups
            g = tokens[:, :, offset:offset + width].reshape(-1, w.shape[0])
            dh.append(g @ w)
            dws.append(g.t() @ hp if ctx.needs_input_grad[4 + i] else None)
        dh = (dh[0] if len(dh) == 1 else torch.cat(dh, dim=-1)).view(h.shape)
        return grad, None, None, dh, *dws


def _uniform_init(fan_in: int):
    """PEFT's init of A (kaiming uniform, a=sqrt(5)), with the fan-in of the whole matrix even
    when this rank holds a shard of it."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda weight: torch.nn.init.uniform_(weight, -bound, bound)


def _lora_config(config, sequence_parallel: bool):
    """LoRA weights are always initialised (the base checkpoint has none to load)."""
    cfg = copy.copy(config)
    cfg.perform_initialization = True
    cfg.sequence_parallel = sequence_parallel
    return cfg


def _replicated(in_features: int, out_features: int, config, init) -> torch.nn.Linear:
    linear = torch.nn.Linear(in_features, out_features, bias=False, dtype=config.params_dtype)
    with torch.no_grad():
        init(linear.weight)
    # Replicated over TP but fed sequence shards: megatron-core sums its gradient over TP.
    linear.weight.sequence_parallel = config.sequence_parallel
    return linear


class LoRAPair(MegatronModule):
    """One projection's A (`lora_A`) and B (`lora_B`); their layout depends on the base's."""

    def __init__(self, config, in_features: int, out_features: int, column: bool, tp_group):
        super().__init__(config)
        r = config.pesc_lora_rank
        zeros = torch.nn.init.zeros_
        if column:
            self.lora_A = _replicated(in_features, r, config, _uniform_init(in_features))
            # Its input is the gathered full sequence: no sequence parallelism inside B.
            self.lora_B = ColumnParallelLinear(
                r, out_features, config=_lora_config(config, False), init_method=zeros,
                bias=False, gather_output=False, tp_group=tp_group)
        else:
            self.lora_A = RowParallelLinear(
                in_features, r, config=_lora_config(config, config.sequence_parallel),
                init_method=_uniform_init(in_features), bias=False, input_is_parallel=True,
                skip_bias_add=True, tp_group=tp_group)
            self.lora_B = _replicated(r, out_features, config, zeros)


class LoRA(MegatronModule):
    """The LoRA updates of one megatron-core linear (`name`, a key of LINEAR_TARGETS) for the
    targeted projections among its parts; `forward(x, out)` adds their updates for the base's
    input x into `out`, the base's local output."""

    def __init__(self, config, name: str, input_size: int, output_size: int, tp_group):
        super().__init__(config)
        self.tp_group = tp_group  # the base linear's
        self.column = name in ("linear_qkv", "linear_fc1")
        self.scaling = config.pesc_lora_alpha / config.pesc_lora_rank
        self.dropout = config.pesc_lora_dropout
        sizes = self._part_sizes(config, name, input_size, output_size)
        self.parts = [t for t in LINEAR_TARGETS[name] if t in config.pesc_lora_targets]
        for part in self.parts:
            self.add_module(part, LoRAPair(config, input_size, sizes[part], self.column,
                                           tp_group))
        # The base's local output as [groups, width] (per query group q, k, v for qkv; one
        # group of gate then up for fc1, of the one part for a row-parallel base) and each
        # targeted part's column offset in a group: where _AddB adds its B product.
        tp = config.tensor_model_parallel_size if self.column else 1
        self.groups = config.num_query_groups // tp if name == "linear_qkv" else 1
        offsets, offset = {}, 0
        for t in LINEAR_TARGETS[name]:
            offsets[t] = offset
            offset += sizes[t] // tp // self.groups
        self.offsets = [offsets[p] for p in self.parts]

    @staticmethod
    def _part_sizes(config, name, input_size, output_size) -> dict[str, int]:
        if name == "linear_qkv":
            q = config.num_attention_heads * config.kv_channels
            kv = config.num_query_groups * config.kv_channels
            assert q + 2 * kv == output_size, (q, kv, output_size)
            return {"q_proj": q, "k_proj": kv, "v_proj": kv}
        if name == "linear_fc1":
            return {"gate_proj": output_size // 2, "up_proj": output_size // 2}
        return {LINEAR_TARGETS[name][0]: output_size}

    def _down(self, x: torch.Tensor, pairs: list) -> tuple[torch.Tensor, float]:
        """(The parts' local A products side by side, the dropout's rescaling). Each part
        draws its own mask, as PEFT's per-module dropout; LoRA is linear in its input, so the
        rescaling joins `scaling` on the r-wide output."""
        # A's weights are used directly, not through lora_A's forward, so module hooks on it
        # would not run: none is registered (DDP's overlapped parameter gather, gradient-
        # accumulation fusion and CPU offloading stay off: megatron-core's defaults, kept).
        weights = [pair.lora_A.weight for pair in pairs]
        if not self.training or self.dropout == 0:
            hs = [torch.matmul(x, w.t()) for w in weights]
            return (hs[0] if len(hs) == 1 else torch.cat(hs, dim=-1)), 1.0
        # x differs over TP ranks (a sequence or hidden shard): TP-rank-specific masks.
        with tensor_parallel.get_cuda_rng_tracker().fork():
            drawn = [dropout_mask(x, self.dropout) for _ in weights]
        return _DroppedA.apply(x, [m for m, _ in drawn], *weights), drawn[0][1]

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the base's local output for input x) plus the LoRA updates."""
        # The scalings multiply the r-wide A output, not B's [tokens, out] one: the same
        # product (B is linear), a pass over the wide output fewer forward and backward.
        pairs = [getattr(self, p) for p in self.parts]
        h, rescale = self._down(x, pairs)
        h = h * (self.scaling * rescale)  # one p for all parts: the same rescaling
        if not self.column:
            # A is row-parallel: its output reduced over TP as RowParallelLinear's.
            if self.config.sequence_parallel:
                h = reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
            else:
                h = reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
            return _AddB.apply(out, self.groups, self.offsets, h, pairs[0].lora_B.weight)
        if self.config.sequence_parallel:
            # Backward splits instead of reduce-scattering: B's input gradient is all-reduced
            # over TP below, so every rank already holds the full gradient.
            h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False,
                                                     group=self.tp_group)
        if self.config.tensor_model_parallel_size > 1:
            # B is split on its output (ColumnParallelLinear's layout): h's gradient is a
            # partial sum per rank, all-reduced once for all parts, as that layer would.
            h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        return _AddB.apply(out, self.groups, self.offsets, h,
                           *(pair.lora_B.weight for pair in pairs))


def _with_lora(base_cls, name: str):
    """`base_cls` (megatron-core's column- or row-parallel linear) plus LoRA in `self.lora`."""

    class LoRALinear(base_cls):
        def __init__(self, input_size, output_size, *, config, **kwargs):
            super().__init__(input_size, output_size, config=config, **kwargs)
            assert not getattr(self, "gather_output", False)
            self.lora = LoRA(config, name, input_size, output_size, self.tp_group)

        def forward(self, input_, *args, **kwargs):
            output, bias = super().forward(input_, *args, **kwargs)
            return self.lora(input_, output), bias

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            # The base class would save every entry with the base weight's TP axis; the LoRA
            # entries come from LoRA's own (column/row-parallel and replicated) layers instead.
            out = {k: v for k, v in super().sharded_state_dict(prefix, sharded_offsets,
                                                                metadata).items()
                   if not k.startswith(f"{prefix}lora.")}
            out.update(self.lora.sharded_state_dict(f"{prefix}lora.", sharded_offsets, metadata))
            return out

    LoRALinear.__name__ = LoRALinear.__qualname__ = f"LoRA{base_cls.__name__}_{name}"
    return LoRALinear


LORA_LINEARS = {
    linear: _with_lora(ColumnParallelLinear if linear in COLUMN_PARALLEL_LINEARS
                       else RowParallelLinear, linear)
    for linear in LINEAR_TARGETS}
