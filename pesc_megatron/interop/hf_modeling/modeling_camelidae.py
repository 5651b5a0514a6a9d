"""PESC (Parameter-Efficient Sparsity Crafting) models in the released Camelidae layout, on transformers' Llama.

Each decoder layer keeps Llama's frozen SwiGLU FFN ``F`` and adds top-k routed bottleneck adapters on its output:
``y = F(x) + moe_scaling * sum_{j in topk} w_j * up_j(act(down_j(dropout(F(x)))))``, router on ``x``, in fp32.
Everything else (attention, RoPE, KV cache, generate) is inherited from Llama.

This file is copied next to config.json by ``save_pretrained`` (``trust_remote_code`` loading), so it imports only
torch, transformers and, relatively, its configuration.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_camelidae import CamelidaeConfig


class CamelidaeLinear(nn.Linear):
    """Bias-free Linear of the PESC path. HF's generic init (normal, std 0.02) would break the PESC recipe, so these
    get torch's default init (adapter_down) or zeros (adapter_up: a fresh model equals the dense one)."""

    def __init__(self, in_features, out_features, zero_init=False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init


class CamelidaeRouter(nn.Module):
    """The router's weight [E, H] and its logits in at least fp32 (bf16 logits would flip near-tied
    top-k choices). Not an nn.Linear: serving stacks that swap every Linear for their own kernels
    (vLLM's Transformers backend) must leave it, and its dtype, alone."""

    def __init__(self, hidden_size, num_experts):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x):
        dt = torch.promote_types(x.dtype, torch.float32)
        return F.linear(x.to(dt), self.weight.to(dt))


class CamelidaeAdapter(nn.Module):
    """One expert: a bottleneck H -> r -> H."""

    def __init__(self, hidden_size, adapter_dim):
        super().__init__()
        self.adapter_down = CamelidaeLinear(hidden_size, adapter_dim)
        self.adapter_up = CamelidaeLinear(adapter_dim, hidden_size, zero_init=True)


class CamelidaeExperts(nn.Module):
    """Holds the experts as ``expert_{j}`` (the released weight names)."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        for j in range(config.num_experts):
            self.add_module(f"expert_{j}", CamelidaeAdapter(config.hidden_size, config.adapter_dim))

    def __getitem__(self, j):
        return getattr(self, f"expert_{j}")


def route(logits, topk, routing="topk_softmax", renormalize=True):
    """Routing weights and expert indices, both [T, k], from router logits [T, E]."""
    if routing == "topk_softmax":
        top, idx = logits.topk(topk, dim=-1)
        return top.softmax(dim=-1), idx
    if routing == "softmax_topk":
        weights, idx = logits.softmax(dim=-1).topk(topk, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, idx
    raise ValueError(f"unknown routing {routing!r}")


class CamelidaeMoEAdapter(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.topk, self.routing, self.renormalize = config.topk, config.routing, config.renormalize
        self.scaling = config.moe_scaling
        self.router = CamelidaeRouter(config.hidden_size, config.num_experts)
        self.experts = CamelidaeExperts(config)
        self.act = ACT2FN[config.adapter_act]
        self.dropout = nn.Dropout(config.adapter_dropout)

    def forward(self, x, f):
        """x: the MLP input (router input); f: the shared FFN output (experts' input). Returns the layer output."""
        shape = f.shape
        x, f = x.reshape(-1, shape[-1]), f.reshape(-1, shape[-1])
        logits = self.router(x)
        dt = logits.dtype
        weights, idx = route(logits, self.topk, self.routing, self.renormalize)
        out = torch.zeros(f.shape, dtype=dt, device=f.device)
        # One pass per expert over the tokens routed to it; dropout per (token, expert) as each expert has its own.
        for j in range(self.experts.num_experts):
            tok, slot = torch.where(idx == j)
            expert = self.experts[j]
            a = expert.adapter_up(self.act(expert.adapter_down(self.dropout(f[tok]))))
            out.index_add_(0, tok, a.to(dt) * weights[tok, slot, None])
        return (f + self.scaling * out).to(f.dtype).view(shape)


class CamelidaeMLP(LlamaMLP):
    """Llama's FFN (same weight names) plus ``moe_adapter``."""

    def __init__(self, config):
        super().__init__(config)
        self.moe_adapter = CamelidaeMoEAdapter(config)

    def forward(self, x):
        return self.moe_adapter(x, super().forward(x))


class CamelidaeAttention(LlamaAttention):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        if config.qkv_bias and not config.attention_bias:
            # Qwen2: biases on q/k/v only. nn.Linear reads self.bias, so adding the parameter is enough.
            for proj in (self.q_proj, self.k_proj, self.v_proj):
                proj.bias = nn.Parameter(proj.weight.new_zeros(proj.out_features))


class CamelidaeDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, layer_idx):
        # Build the submodules here rather than in LlamaDecoderLayer.__init__, which would build (and discard) a
        # Llama FFN per layer; forward is Llama's.
        super(LlamaDecoderLayer, self).__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = CamelidaeAttention(config, layer_idx)
        self.mlp = CamelidaeMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class CamelidaePreTrainedModel(LlamaPreTrainedModel):
    config_class = CamelidaeConfig
    config: CamelidaeConfig
    _no_split_modules = ["CamelidaeDecoderLayer"]
    _keep_in_fp32_modules_strict = ["router"]  # trained and stored in fp32, as in pesc-megatron

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, CamelidaeRouter):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))  # as CamelidaeLinear's default
        elif isinstance(module, CamelidaeLinear):
            # Matched on the Linear itself: for custom code HF skips parents without direct parameters.
            if module.zero_init:
                init.zeros_(module.weight)
            else:
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        else:
            super()._init_weights(module)


class CamelidaeModel(CamelidaePreTrainedModel, LlamaModel):
    def __init__(self, config):
        # As LlamaModel.__init__, with Camelidae layers (skipping it avoids building Llama layers first).
        super(LlamaModel, self).__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(CamelidaeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class CamelidaeForCausalLM(CamelidaePreTrainedModel, LlamaForCausalLM):
    def __init__(self, config):
        super(LlamaForCausalLM, self).__init__(config)
        self.model = CamelidaeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


# save_pretrained then writes auto_map["AutoModelForCausalLM"] and copies this file.
CamelidaeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["CamelidaePreTrainedModel", "CamelidaeModel", "CamelidaeForCausalLM"]
