"""Declarative weight mapping between Hugging Face decoders and the megatron-core PESC model.

One table per architecture: each rule names a megatron-core tensor, the Hugging Face tensors it
is made of and how (`copy`, `qkv`: q/k/v fused per query group as megatron-core's linear_qkv,
`gate_up`: gate and up stacked as linear_fc1; interop/reshape.py does it). `{L}` is a layer
index, `{E}` an expert index. `read_hf_config` reads a Hugging Face config.json. No torch here:
`pesc info` and `pesc plan` read configs without it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from pesc_megatron.model.config import ATTENTION_LINEARS, LORA_LINEAR_OF, ModelConfig, PESCConfig
from pesc_megatron.schema import ConfigError


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    kind: str = "copy"


_ATTN = "model.layers.{L}.self_attn."
_MLP = "model.layers.{L}.mlp."
_DEC = "decoder.layers.{L}."

DENSE_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule(_DEC + "input_layernorm.weight", ("model.layers.{L}.input_layernorm.weight",)),
    Rule(_DEC + "self_attention.linear_qkv.weight",
         (_ATTN + "q_proj.weight", _ATTN + "k_proj.weight", _ATTN + "v_proj.weight"), "qkv"),
    Rule(_DEC + "self_attention.linear_proj.weight", (_ATTN + "o_proj.weight",)),
    Rule(_DEC + "pre_mlp_layernorm.weight", ("model.layers.{L}.post_attention_layernorm.weight",)),
    Rule(_DEC + "mlp.shared_experts.linear_fc1.weight",
         (_MLP + "gate_proj.weight", _MLP + "up_proj.weight"), "gate_up"),
    Rule(_DEC + "mlp.shared_experts.linear_fc2.weight", (_MLP + "down_proj.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",)),
)
QKV_BIAS_RULES = (
    Rule(_DEC + "self_attention.linear_qkv.bias",
         (_ATTN + "q_proj.bias", _ATTN + "k_proj.bias", _ATTN + "v_proj.bias"), "qkv"),
)
# The released Camelidae layout of the router and the adapter experts.
PESC_RULES = (
    Rule(_DEC + "mlp.router.weight", (_MLP + "moe_adapter.router.weight",)),
    Rule(_DEC + "mlp.experts.local_experts.{E}.linear_fc1.weight",
         (_MLP + "moe_adapter.experts.expert_{E}.adapter_down.weight",)),
    Rule(_DEC + "mlp.experts.local_experts.{E}.linear_fc2.weight",
         (_MLP + "moe_adapter.experts.expert_{E}.adapter_up.weight",)),
)

# LoRA (model/lora.py): where each megatron-core linear, and the Hugging Face module of each
# target, sits in layer L.
LORA_LINEAR_PATHS = {"linear_qkv": "self_attention.linear_qkv",
                     "linear_proj": "self_attention.linear_proj",
                     "linear_fc1": "mlp.shared_experts.linear_fc1",
                     "linear_fc2": "mlp.shared_experts.linear_fc2"}


def lora_modules(target: str) -> tuple[str, str]:
    """(megatron-core linear, Hugging Face module) of a LoRA target within a layer."""
    linear = LORA_LINEAR_OF[target]
    return (LORA_LINEAR_PATHS[linear],
            ("self_attn." if linear in ATTENTION_LINEARS else "mlp.") + target)


def lora_pairs(state: dict, targets, num_layers: int):
    """Yields (Hugging Face module name, A, B) for every LoRA pair in a TP=1 state dict."""
    for layer in range(num_layers):
        for t in targets:
            linear, module = lora_modules(t)
            key = f"decoder.layers.{layer}.{linear}.lora.{t}."
            yield (f"model.layers.{layer}.{module}", state[key + "lora_A.weight"],
                   state[key + "lora_B.weight"])


ARCHITECTURES = {
    "LlamaForCausalLM": DENSE_RULES,  # Llama 2/3, Yi, SmolLM
    "MistralForCausalLM": DENSE_RULES,
    "Qwen2ForCausalLM": DENSE_RULES + QKV_BIAS_RULES,
    "CamelidaeForCausalLM": DENSE_RULES,  # + QKV_BIAS_RULES when its config says qkv_bias
}


def rules_for(architecture: str, model: ModelConfig, with_pesc: bool) -> list[Rule]:
    rules = [r for r in ARCHITECTURES[architecture]
             if not (r.megatron == "output_layer.weight" and model.tie_word_embeddings)]
    if model.attention_bias and not any(r in rules for r in QKV_BIAS_RULES):
        rules += QKV_BIAS_RULES
    return rules + list(PESC_RULES if with_pesc else ())


def expand(rules: list[Rule], num_layers: int, num_experts: int):
    """Yields (megatron_name, hf_names, kind) for every concrete tensor."""
    for rule in rules:
        layers = range(num_layers) if "{L}" in rule.megatron else [None]
        experts = range(num_experts) if "{E}" in rule.megatron else [None]
        for layer in layers:
            for expert in experts:
                fmt = dict(L=layer, E=expert)
                yield (rule.megatron.format(**fmt), tuple(h.format(**fmt) for h in rule.hf),
                       rule.kind)


def _rope(cfg: dict, where: str) -> tuple[float, float | None]:
    """(theta, llama3 scaling factor or None) from a transformers 4 or 5 config.json."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or params
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    theta = params.get("rope_theta", cfg.get("rope_theta", ModelConfig.rope_theta))
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    llama31 = dict(low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    if kind != "llama3" or any(float(scaling.get(k, -1)) != v for k, v in llama31.items()):
        raise ConfigError(
            f"{where}: rope scaling {scaling} is not supported (only llama3 scaling with "
            "low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192)")
    return float(theta), float(scaling["factor"])


def read_hf_config(cfg: dict, where: str) -> tuple[str, ModelConfig, PESCConfig | None]:
    """(architecture, ModelConfig, PESCConfig for Camelidae checkpoints else None)."""
    try:
        return _read_hf_config(cfg, where)
    except KeyError as e:
        raise ConfigError(f"{where}: required key {e} is missing") from None


# Camelidae config keys that may be missing (the released configs lack ours) -> PESCConfig.
CAMELIDAE_OPTIONAL = {"adapter_dropout": "adapter_dropout", "adapter_act": "adapter_activation",
                      "routing": "routing", "renormalize": "renormalize"}


def _read_hf_config(cfg: dict, where: str) -> tuple[str, ModelConfig, PESCConfig | None]:
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if cfg.get("model_type") == "camelidae":
        arch = "CamelidaeForCausalLM"
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{where}: architecture {arch!r} (model_type "
                          f"{cfg.get('model_type')!r}) is not supported; supported: "
                          f"{', '.join(ARCHITECTURES)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={cfg['hidden_act']!r} is not supported (silu)")
    if arch != "Qwen2ForCausalLM" and cfg.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true (biases on q/k/v/o) is not supported")
    if cfg.get("mlp_bias"):
        raise ConfigError(f"{where}: mlp_bias=true is not supported")
    theta, factor = _rope(cfg, where)
    window = cfg.get("sliding_window")
    if window and (arch != "Qwen2ForCausalLM" or cfg.get("use_sliding_window")):
        warnings.warn(f"{where}: sliding_window={window} is not applied: sequences longer than "
                      f"{window} tokens attend to their whole prefix, unlike the source model")
    # Keys a config may omit take ModelConfig's / PESCConfig's defaults (transformers' own for
    # Llama and Qwen2; the released models' for the Camelidae fields).
    present = {k: cfg[k] for k in ("max_position_embeddings", "rms_norm_eps")
               if cfg.get(k) is not None}
    model = ModelConfig(
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads"),
        head_dim=cfg.get("head_dim"),
        vocab_size=cfg["vocab_size"],
        rope_theta=theta,
        rope_scaling_factor=factor,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("qkv_bias", False)),
        **present,
    )
    pesc = None
    if arch == "CamelidaeForCausalLM":
        optional = {ours: cfg[theirs] for theirs, ours in CAMELIDAE_OPTIONAL.items()
                    if cfg.get(theirs) is not None}
        pesc = PESCConfig(num_experts=cfg["num_experts"], topk=cfg["topk"],
                          adapter_dim=cfg["adapter_dim"],
                          adapter_scaling=float(cfg["moe_scaling"]), **optional)
    return arch, model, pesc
