"""Layer specs: megatron-core's local GPT layer with the PESC block as its MLP."""
from __future__ import annotations

import copy
import logging

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from pesc_megatron.model.attention import SDPAttention
from pesc_megatron.model.config import LINEAR_TARGETS
from pesc_megatron.model.lora import LORA_LINEARS
from pesc_megatron.model.norm import SequenceParallelTorchNorm
from pesc_megatron.model.pesc_layer import PESCAdapterExperts, PESCMoELayer, PESCRouter
from pesc_megatron.schema import ConfigError


class _DropUnknownMLPWarning(logging.Filter):
    """TransformerLayer passes its process groups only to MLP classes it knows by identity and
    warns for every other layer; PESCMoELayer then takes megatron-core's default groups, which
    are the same ones. Drop that one warning so that it is not printed once per layer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(
    _DropUnknownMLPWarning())


def _linear(name: str, default, lora_targets) -> type:
    """megatron-core's linear `default`, or its LoRA version if one of its projections is a
    LoRA target."""
    wanted = set(LINEAR_TARGETS[name]) & set(lora_targets)
    return LORA_LINEARS[name] if wanted else default


def pesc_mlp_spec(lora_targets=()) -> ModuleSpec:
    adapters = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    shared = MLPSubmodules(
        linear_fc1=_linear("linear_fc1", ColumnParallelLinear, lora_targets),
        linear_fc2=_linear("linear_fc2", RowParallelLinear, lora_targets))
    return ModuleSpec(
        module=PESCMoELayer,
        submodules=MoESubmodules(
            router=PESCRouter,
            experts=ModuleSpec(module=PESCAdapterExperts, submodules=adapters),
            # MoELayer passes gate=config.moe_shared_expert_gate (False by default).
            shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=shared),
        ),
    )


def core_attention(attention: str) -> type:
    """The core attention class of a `model.attention` choice (model/attention.py)."""
    if attention == "te":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    return {"sdpa": SDPAttention, "local": DotProductAttention}[attention]


def get_pesc_layer_local_spec(num_experts: int, normalization: str = "RMSNorm",
                              lora_targets=(), attention: str = "sdpa") -> ModuleSpec:
    """megatron-core's local (no TE, no apex) GPT layer with PESC's MLP, SP-capable norms,
    the chosen core attention and LoRA on the targeted projections."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(num_experts=num_experts,
                                                  normalization=normalization))
    sub = spec.submodules
    sub.input_layernorm = SequenceParallelTorchNorm
    sub.pre_mlp_layernorm = SequenceParallelTorchNorm
    attn = sub.self_attention.submodules
    attn.core_attention = core_attention(attention)
    attn.linear_qkv = _linear("linear_qkv", attn.linear_qkv, lora_targets)
    attn.linear_proj = _linear("linear_proj", attn.linear_proj, lora_targets)
    sub.mlp = pesc_mlp_spec(lora_targets)
    return spec


def get_pesc_layer_te_spec(num_experts: int, normalization: str = "RMSNorm",
                           lora_targets=(), attention: str = "te") -> ModuleSpec:
    """GPU only, not yet run on one: the local layer with Transformer Engine's linears for the
    frozen base (qkv, proj, the shared FFN's fc1 and fc2), so that its GEMMs run in FP8 under
    TE's recipes (`precision.fp8`), and by default TE's fused attention (THD packed sequences
    through `packed_seq_params`). Norms, router and adapter experts stay local and in high
    precision."""
    if lora_targets:
        raise ConfigError("lora.targets with precision.fp8: LoRA on Transformer Engine's "
                          "linears is not implemented; use precision.frozen_weights=fp8")
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TERowParallelLinear,
    )

    spec = get_pesc_layer_local_spec(num_experts, normalization, attention=attention)
    attn = spec.submodules.self_attention.submodules
    attn.linear_qkv, attn.linear_proj = TEColumnParallelLinear, TERowParallelLinear
    shared = spec.submodules.mlp.submodules.shared_experts.submodules
    shared.linear_fc1, shared.linear_fc2 = TEColumnParallelLinear, TERowParallelLinear
    return spec


def get_pesc_block_spec(config, vp_stage=None) -> TransformerBlockSubmodules:
    """This pipeline stage's layers (Transformer Engine's linears for the base with
    `config.fp8`), with the SP-capable final norm."""
    layer_spec = get_pesc_layer_te_spec if config.fp8 else get_pesc_layer_local_spec
    layer = layer_spec(config.num_moe_experts, config.normalization, config.pesc_lora_targets,
                       config.pesc_attention)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers,
                                      layer_norm=SequenceParallelTorchNorm)
