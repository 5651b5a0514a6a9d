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
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    save_to_aux_losses_tracker,
    z_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from pesc_megatron.model.config import LoRAConfig, PESCConfig

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@dataclasses.dataclass
class PESCTransformerConfig(TransformerConfig):
    """TransformerConfig plus the PESC fields. The adapter width is `moe_ffn_hidden_size`, the
    shared FFN width `moe_shared_expert_intermediate_size` (= ffn_hidden_size)."""

    # Defaults: PESCConfig's and LoRAConfig's (model/config.py); the builder sets them all.
    pesc_adapter_scaling: float = PESCConfig.adapter_scaling
    pesc_adapter_dropout: float = PESCConfig.adapter_dropout
    pesc_adapter_activation: str = PESCConfig.adapter_activation
    # Core attention: sdpa (torch's fused kernels) | local (megatron-core's unfused) | te
    pesc_attention: str = "sdpa"
    # Adapter experts: grouped (torch._grouped_mm) | sequential (megatron-core's loop)
    pesc_experts: str = "grouped"
    # LoRA on the frozen base (model/lora.py); no targets: none.
    pesc_lora_targets: tuple = ()
    pesc_lora_rank: int = LoRAConfig.rank
    pesc_lora_alpha: float = LoRAConfig.alpha
    pesc_lora_dropout: float = LoRAConfig.dropout


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


def dropout_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A training-mode dropout mask for x (uint8, 1 = kept; p > 0) and its rescaling factor.
    On CPU it takes 16 random bits per element, four from each 64-bit draw (`random_` over
    int64's full range, uniform in all 64 bits), about a fifth of bernoulli_'s cost; p is
    realised to a multiple of 1/65536 and the factor is exactly 1 / (1 - that p), so the
    expectation is unchanged. On CUDA it is bernoulli_ at 1 - p."""
    if x.is_cuda:
        return torch.empty(x.shape, dtype=torch.uint8, device=x.device).bernoulli_(1 - p), \
            1 / (1 - p)
    threshold = round(p * 65536)
    words = torch.empty(-(-x.numel() // 4), dtype=torch.int64, device=x.device).random_(
        -2**63, None)
    keep = (words.view(torch.int16)[: x.numel()] >= threshold - 32768).view(x.shape)
    # the bool mask's bytes read as uint8 (a view): x * mask forward + backward 1.0 against
    # 3.9 ms for where(keep, x, 0) at [2048, 576], whose backward also materialises zeros
    return keep.view(torch.uint8), 65536 / (65536 - threshold)


def dropout_unscaled(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Training-mode dropout without its rescaling: x with a fraction p of its elements zeroed,
    and the factor 1 / (1 - p) for the caller to apply where it is cheapest (after the next
    linear map, on its narrower output: a pass over x fewer, forward and backward); autograd
    keeps the mask, 1 byte an element. On CUDA it is F.dropout, already scaled (factor 1)."""
    if p == 0.0:
        return x, 1.0
    if x.is_cuda:
        return F.dropout(x, p, training=True), 1.0
    keep, factor = dropout_mask(x, p)
    return x * keep, factor


class PESCRouter(TopKRouter):
    """megatron-core's router with the z-loss a mean over the valid tokens of the whole
    sequence. megatron-core divides the z-loss coefficient by the TP x CP size and each rank
    takes the mean over its own valid tokens: with padding (`padding_mask`) under sequence
    parallelism the ranks hold different numbers of valid tokens and that mean of means is not
    the mean (found by the packed parity test at TP=2: router gradients 30% off)."""

    def apply_z_loss(self, logits, padding_mask: Optional[torch.Tensor] = None):
        group = self.tp_cp_group
        if (padding_mask is None or group.size() == 1 or self.calculate_per_token_loss
                or self.config.moe_z_loss_coeff is None or not self.training
                or not torch.is_grad_enabled()):
            return super().apply_z_loss(logits, padding_mask)
        coeff = self.config.moe_z_loss_coeff
        valid = (~padding_mask).sum().to(torch.float32)
        total = valid.clone()
        torch.distributed.all_reduce(total, group=group)
        # z_loss_func is coeff * (local sum / valid): rescaled, coeff * local sum / total.
        z_loss = z_loss_func(logits, coeff, padding_mask=padding_mask) * valid / total.clamp(
            min=1)
        logits = MoEAuxLossAutoScaler.apply(logits, z_loss)
        save_to_aux_losses_tracker("z_loss", z_loss / coeff, self.layer_number,
                                   self.config.num_layers, reduce_group=group)
        return logits


def grouped_mm_runs(x: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM runs for `x`: on CPU in fp32/bf16/fp16 (not fp64), on
    CUDA in bf16 from Hopper on."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if not x.is_cuda:
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)


class PESCAdapterExperts(SequentialMLP):
    """The local adapter experts; W_up is zero at init so a crafted model equals the dense one.

    `config.pesc_experts`: "grouped" computes all local experts as two grouped GEMMs
    (`torch._grouped_mm` over the tokens sorted by expert, the same weights stacked) instead
    of megatron-core's loop of 2E small GEMMs ("sequential", SequentialMLP's own forward,
    kept as the reference and used where the grouped kernel cannot run). Parameters, sharded
    state dict and checkpoints are SequentialMLP's either way."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, **kwargs):
        # **kwargs: arguments newer megatron-core releases add (0.19: `name`).
        super().__init__(num_local_experts, adapter_config(config), submodules, pg_collection,
                         **kwargs)
        self.dropout = config.pesc_adapter_dropout
        self.grouped = config.pesc_experts == "grouped"
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
        scale = 1.0
        if self.training and self.dropout > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork(
                tensor_parallel.get_expert_parallel_rng_tracker_name()
            ):
                hidden_states, scale = dropout_unscaled(hidden_states, self.dropout)
        if (self.grouped and grouped_mm_runs(hidden_states) and hidden_states.shape[0] > 0
                and not self.config.moe_apply_probs_on_input):
            return self._grouped_forward(hidden_states, tokens_per_expert, permuted_probs,
                                         scale), None
        if scale != 1.0:
            hidden_states = hidden_states * scale  # SequentialMLP's own fc1 reads it
        return super().forward(hidden_states, tokens_per_expert, permuted_probs, **kwargs)

    def _grouped_forward(self, x, tokens_per_expert, probs, scale: float = 1.0):
        """What SequentialMLP computes (megatron-core's MLP with per_token_scale: the routing
        weight scales the activation before fc2), as two grouped GEMMs. `scale`: the dropout's
        rescaling of x, applied to the r-wide fc1 output instead."""
        fc1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])  # [E, r, H]
        fc2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])  # [E, H, r]
        counts = torch.as_tensor(tokens_per_expert, device=x.device)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        h = torch._grouped_mm(x, fc1.transpose(1, 2), offs=offsets)
        h = self.config.activation_func(h * scale if scale != 1.0 else h)
        h = (h * probs.unsqueeze(-1)).to(x.dtype)
        return torch._grouped_mm(h, fc2.transpose(1, 2), offs=offsets)


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
        # one pass (a + alpha b), not a product and a sum: 0.45 against 1.35 ms at [4096, 576]
        return torch.add(shared, output, alpha=self.adapter_scaling), None

