"""Core attention for megatron-core's layer spec: torch's fused kernels, with packed sequences.

megatron-core's `core_attention` submodule receives query [sq, b, np, hn] and key/value
[sk, b, ng, hn] (this TP rank's heads), or, with THD `packed_seq_params`, [t, np, hn] and
[t, ng, hn] for the b packed sequences' samples laid end to end (`cu_seqlens` gives their
boundaries), and returns [sq, b, np * hn] (or [t, np * hn]). Three implementations:

- `SDPAttention` ("sdpa", the default): causal `scaled_dot_product_attention` with GQA done by
  the kernel (no repeated K/V). Packed: on CUDA with 16-bit inputs torch's varlen (flash)
  attention over `cu_seqlens`; elsewhere one causal SDPA call per sample, which computes only
  the samples' own diagonal blocks (measured on 2 CPU cores, s=2048 in 7 samples, 9 heads / 3
  KV heads, forward + backward: 0.04 s per call against 0.25 s for SDPA with a block-diagonal
  mask and 0.53 s for the unfused math; all equal within 2e-6).
- megatron-core's unfused reference `DotProductAttention` ("local"), which takes no
  packed_seq_params: packed sequences keep their [s, b] layout and get a block-diagonal causal
  mask, built on the device from the same boundaries (`block_causal_mask`, train/step.py).
- Transformer Engine's `TEDotProductAttention` ("te", GPU with TE; see model/spec.py).

RoPE positions of packed samples restart at 0 per sample on the THD paths: megatron-core's THD
RoPE reads the same `cu_seqlens` (`apply_rotary_pos_emb(..., cu_seqlens=...)`), as Hugging
Face's per-sample position_ids do. The local path rotates by absolute positions in the
sequence (megatron-core's RoPE ignores position_ids); as the mask keeps every score within one
sample, each score depends only on the two tokens' distance, which is the same.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from pesc_megatron.parallel.mcore_patches import have_te
from pesc_megatron.schema import ConfigError
from pesc_megatron.train.config import ATTENTIONS

try:  # torch's flash-attention varlen kernels (CUDA); absent in older releases
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - depends on the torch release
    varlen_attn = None


def sample_bounds(packed_seq_params) -> list[int]:
    """The packed samples' boundaries [0, n0, n0 + n1, ..., t] on the host."""
    return packed_seq_params.cu_seqlens_q.tolist()


def block_causal_mask(cu_seqlens: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """[b, 1, s, s], True = masked (megatron-core's convention): causal within each sample,
    nothing across samples, for b sequences of s positions whose boundaries `cu_seqlens` gives
    laid end to end (each sequence's end is one of them). Built on cu_seqlens' device."""
    pos = torch.arange(b * s, device=cu_seqlens.device)
    sample = torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True).view(b, s, 1)
    allowed = (sample == sample.transpose(1, 2)) & torch.ones(
        s, s, dtype=torch.bool, device=pos.device).tril()
    return (~allowed).unsqueeze(1)


def uses_thd(config) -> bool:
    """Whether packed sequences reach this model's attention as THD (all but `local`)."""
    return config.pesc_attention != "local"


class SDPAttention(MegatronModule):
    """megatron-core's core attention interface on torch's fused kernels (module docstring)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, **kwargs):
        super().__init__(config=config)
        assert attention_type == "self" and attn_mask_type == AttnMaskType.causal, (
            "SDPAttention implements causal self-attention")
        assert config.context_parallel_size == 1, "SDPAttention does not split the sequence (CP)"
        assert getattr(config, "softmax_type", "vanilla") == "vanilla", (
            "SDPAttention has no softmax offset")
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(
            config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def _sdpa(self, q, k, v, **kwargs):
        """SDPA on [..., heads, s, hn] tensors; K/V may have fewer heads (GQA)."""
        p = self.dropout if self.training else 0.0
        gqa = q.shape[-3] != k.shape[-3]
        if p == 0.0:
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=gqa,
                                                  **kwargs)
        with tensor_parallel.get_cuda_rng_tracker().fork():  # as megatron-core's dropout
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale,
                                                  enable_gqa=gqa, **kwargs)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        assert attention_bias is None, "SDPAttention takes no attention bias"
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        # [s, b, heads, hn] -> [b, heads, s, hn]; v copied, as in _packed
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value.contiguous()))
        if attention_mask is None:
            out = self._sdpa(q, k, v, is_causal=True)
        else:  # an explicit mask (True = masked)
            out = self._sdpa(q, k, v, attn_mask=~attention_mask)
        sq, b = query.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _packed(self, query, key, value, packed_seq_params):
        assert packed_seq_params.qkv_format == "thd", "packed sequences come as THD"
        t = query.shape[0]
        if (varlen_attn is not None and query.is_cuda and self.dropout == 0.0
                and query.dtype in (torch.float16, torch.bfloat16)):
            cu = packed_seq_params.cu_seqlens_q.to(torch.int32)
            out = varlen_attn(query, key, value, cu, cu, packed_seq_params.max_seqlen_q,
                              packed_seq_params.max_seqlen_q, scale=self.scale,
                              window_size=(-1, 0), enable_gqa=query.shape[1] != key.shape[1])
            return out.reshape(t, -1)
        # One causal call per sample's diagonal block, each [1, heads, n, hn]. 4-D on purpose:
        # torch picks its CPU flash kernel for 4-D inputs only (3-D ones take the math path,
        # which keeps every sample's [heads, n, n] probabilities). split, not slicing: its
        # backward is one cat, a slice's a zero-filled full-size gradient per sample.
        # v is a view of the fused qkv projection: a copy lets that output go (saves
        # (q + 2 kv) - kv elements a token and layer of activation memory).
        bounds = sample_bounds(packed_seq_params)
        sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        samples = zip(query.split(sizes), key.split(sizes), value.contiguous().split(sizes))
        outs = [self._sdpa(*(x.transpose(0, 1).unsqueeze(0) for x in qkv), is_causal=True)
                .squeeze(0).transpose(0, 1) for qkv in samples if qkv[0].shape[0]]
        return torch.cat(outs).reshape(t, -1)


def resolve_attention(choice: str, key: str = "model.attention") -> str:
    """`auto` -> te where Transformer Engine imports and CUDA runs, else sdpa. A choice this
    machine cannot run is a ConfigError naming `key`, the value and what is available."""
    te = have_te() and torch.cuda.is_available()
    available = ["sdpa", "local"] + (["te"] if te else [])
    if choice == "auto":
        return "te" if te else "sdpa"
    if choice not in available:
        why = "" if choice not in ATTENTIONS else (
            " (Transformer Engine's attention needs TE and a CUDA GPU)")
        raise ConfigError(f"{key}={choice}: not available on this machine{why}; available: "
                          f"auto, {', '.join(available)}")
    return choice
