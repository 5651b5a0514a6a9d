"""Configuration of PESC models in the released Camelidae layout (a Llama config plus MoE-adapter fields).

This file is copied next to config.json by ``save_pretrained`` (``trust_remote_code`` loading), so it imports only
transformers / huggingface_hub.
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class CamelidaeConfig(LlamaConfig):
    model_type = "camelidae"
    # the name MoE tooling (vLLM, Mixtral-style code) reads the router's k by
    attribute_map = {**LlamaConfig.attribute_map, "num_experts_per_tok": "topk"}

    # Fields of the released Camelidae configs.
    num_experts: int = 8
    topk: int = 2
    adapter_dim: int = 512
    moe_scaling: int | float = 0.25
    moe_dtype: str = "bfloat16"  # kept for compatibility; the adapters run in the model's dtype
    # Ours; the defaults reproduce the released models, whose configs lack these keys.
    routing: Literal["topk_softmax", "softmax_topk"] = "topk_softmax"
    renormalize: bool = True  # softmax_topk only: rescale the k weights to sum 1
    adapter_act: str = "gelu"  # exact GELU
    adapter_dropout: int | float = 0.1
    # Qwen2-style biases on q/k/v only (Llama's `attention_bias` also puts one on o_proj).
    qkv_bias: bool = False

    def validate_pesc(self):
        if not 1 <= self.topk <= self.num_experts:
            raise ValueError(f"topk ({self.topk}) must be in [1, num_experts={self.num_experts}]")


# save_pretrained then writes auto_map["AutoConfig"] and copies this file.
CamelidaeConfig.register_for_auto_class()

__all__ = ["CamelidaeConfig"]
