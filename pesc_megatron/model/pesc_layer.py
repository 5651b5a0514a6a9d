"""The PESC mixture-of-adapters block as a megatron-core MoE layer.

    y = F(x) + s * sum_{j in topk(x)} w_j(x) * A_j(F(x))

F is the frozen dense SwiGLU FFN (megatron-core's shared expert), the router reads x, and the
experts are bottleneck adapters A_j(u) = W_up_j act(W_down_j dropout(u)) that read F(x).
megatron-core supplies the router (TopKRouter: routing, aux/z losses), the token dispatchers
and the expert container (SequentialMLP); only the data flow differs from its MoELayer.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@dataclasses.dataclass
class PESCTransformerConfig(TransformerConfig):
    """TransformerConfig plus the PESC fields. The adapter width is `moe_ffn_hidden_size`, the
    shared FFN width `moe_shared_expert_intermediate_size` (= ffn_hidden_size)."""

    pesc_adapter_scaling: float = 0.25
    pesc_adapter_dropout: float = 0.1
    pesc_adapter_activation: str = "gelu"
    # LoRA on the frozen base (model/lora.py); no targets: none.
    pesc_lora_targets: tuple = ()
    pesc_lora_rank: int = 64
    pesc_lora_alpha: float = 16.0
    pesc_lora_dropout: float = 0.1


def adapter_config(config: PESCTransformerConfig) -> PESCTransformerConfig:
    """The experts' config: non-gated, bias-free bottlenecks of width moe_ffn_hidden_size."""
    cfg = copy.copy(config)
    cfg.gated_linear_unit = False
    cfg.activation_func = _ACTIVATIONS[config.pesc_adapter_activation]
    cfg.add_bias_linear = False
    cfg.bias_activation_fusion = False
    return cfg


def _torch_linear_init(weight: torch.Tensor) -> None:
    """torch.nn.Linear's default init (kaiming uniform, a=sqrt(5)), as the reference code."""
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def adapter_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout. On CPU the mask comes from 16 random bits per element, half the
    random draws of F.dropout's bernoulli, whose cost was most of the layer's overhead over the
    dense FFN (`pesc bench layer`). p is realised to a multiple of 1/65536, and the kept values
    are scaled by exactly 1/(1 - that p), so the expectation is unchanged."""
    if x.is_cuda or p == 0.0:
        return F.dropout(x, p, training=True)
    threshold = round(p * 65536)
    words = torch.randint(-2**31, 2**31 - 1, ((x.numel() + 1) // 2,), dtype=torch.int32)
    bits = words.view(torch.int16)[: x.numel()].view(x.shape)
    keep = bits >= threshold - 32768
    return torch.where(keep, x * (65536 / (65536 - threshold)), 0.0)


class PESCAdapterExperts(SequentialMLP):
    """The local adapter experts; W_up is zero at init so a crafted model equals the dense one."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, **kwargs):
        # **kwargs: arguments newer megatron-core releases add (0.19: `name`).
        super().__init__(num_local_experts, adapter_config(config), submodules, pg_collection,
                         **kwargs)
        self.dropout = config.pesc_adapter_dropout
        # megatron-core marks expert weights for the expert-data-parallel reduction only when
        # ep > 1; with ep == 1 and etp < tp they are replicated over tensor-parallel ranks that
        # see different tokens, yet reduced over the dense DP group only. Always reduce them over
        # the expert-data-parallel group (which contains those ranks).
        for param in self.parameters():
            param.allreduce = False
        with torch.no_grad(), tensor_parallel.get_cuda_rng_tracker().fork(
            tensor_parallel.get_expert_parallel_rng_tracker_name()
        ):
            for expert in self.local_experts:
                _torch_linear_init(expert.linear_fc1.weight)
                expert.linear_fc2.weight.zero_()

    def forward(self, hidden_states, tokens_per_expert, permuted_probs, **kwargs):
        # Each (token, expert) pair is its own row here, so every expert draws its own mask.
        if self.training and self.dropout > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork(
                tensor_parallel.get_expert_parallel_rng_tracker_name()
            ):
                hidden_states = adapter_dropout(hidden_states, self.dropout)
        return super().forward(hidden_states, tokens_per_expert, permuted_probs, **kwargs)


class PESCMoELayer(MoELayer):
    """megatron-core's MoELayer with PESC's data flow (see the module docstring)."""

    def __init__(self, config: PESCTransformerConfig, submodules=None, layer_number=None,
                 pg_collection=None, **kwargs):
        assert config.moe_shared_expert_intermediate_size is not None, "PESC needs the shared FFN"
        # **kwargs: arguments newer megatron-core releases add (0.19: is_mtp_layer, name).
        super().__init__(config, submodules, layer_number, pg_collection, **kwargs)
        self.adapter_scaling = config.pesc_adapter_scaling
        # The router is trained in fp32 whatever the model's dtype (megatron-core would keep its
        # weight in params_dtype and only compute the logits in fp32).
        self.router.weight.data = self.router.weight.data.float()
        with torch.no_grad():
            _torch_linear_init(self.router.weight)
        # Tokens this rank routed to each expert since last read (train.metrics.pop_expert_load).
        self.register_buffer(
            "expert_load", torch.zeros(config.num_moe_experts, dtype=torch.float64),
            persistent=False)

    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        with torch.no_grad():
            counted = routing_map if padding_mask is None else (
                routing_map & ~padding_mask.reshape(-1, 1))
            self.expert_load += counted.sum(dim=0, dtype=torch.float64)
        return probs, routing_map

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None,
                padding_mask: Optional[torch.Tensor] = None):
        assert intermediate_tensors is None, "PESC does not support partial CUDA-graph capture"
        if padding_mask is not None:
            padding_mask = padding_mask.transpose(0, 1).bool()
        shared = self.shared_experts(hidden_states)  # F(x), frozen
        probs, routing_map = self.route(hidden_states, padding_mask)  # router reads x
        expert_input, probs = self.preprocess(shared, probs, routing_map)  # experts read F(x)
        expert_input, probs = self.dispatch(expert_input, probs)
        output, _ = self.routed_experts_compute(expert_input, probs)
        output = self.token_dispatcher.combine_postprocess(self.combine(output))
        return shared + self.adapter_scaling * output, None

