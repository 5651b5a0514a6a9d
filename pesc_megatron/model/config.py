"""The model's settings: the dense architecture (`ModelConfig`), the PESC method
(`PESCConfig`) and LoRA on the frozen base (`LoRAConfig`). Every default lives here."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

from pesc_megatron.schema import ConfigError, invalid

ROUTINGS = ("topk_softmax", "softmax_topk")
ACTIVATIONS = ("gelu", "relu", "silu")
DISPATCHERS = ("alltoall", "allgather")


@dataclass
class ModelConfig:
    """The dense decoder, in Hugging Face's terms (LlamaConfig / Qwen2Config field names)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: Optional[int] = None  # None: same as num_attention_heads (no GQA)
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    vocab_size: int = 256
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling_factor: Optional[float] = None  # Llama 3.1-style (llama3) RoPE scaling
    rms_norm_eps: float = 1e-6  # transformers' LlamaConfig / Qwen2Config default
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads


@dataclass
class PESCConfig:
    """The PESC method: experts are bottleneck adapters on the output of one frozen FFN."""

    SECTION: ClassVar[str] = "pesc"
    num_experts: int = 8
    topk: int = 2
    adapter_dim: int = 512
    adapter_scaling: float = 0.25
    adapter_dropout: float = 0.1
    adapter_activation: str = "gelu"  # exact GELU, as the released models
    routing: str = "topk_softmax"  # or softmax_topk
    renormalize: bool = True  # softmax_topk only: rescale the k weights to sum to 1
    aux_loss_coeff: float = 0.01  # Switch/GShard load balancing
    z_loss_coeff: float = 0.0
    capacity_factor: Optional[float] = None  # None: dropless
    dispatcher: str = "alltoall"

    def __post_init__(self):
        def bad(key, msg):
            raise invalid(self.SECTION, self, key, msg)

        if self.num_experts < 1:
            bad("num_experts", "must be >= 1")
        if not 1 <= self.topk <= self.num_experts:
            bad("topk", f"must be between 1 and num_experts={self.num_experts}")
        if self.adapter_dim < 1:
            bad("adapter_dim", "must be >= 1")
        if not 0.0 <= self.adapter_dropout < 1.0:
            bad("adapter_dropout", "must be in [0, 1)")
        if self.routing not in ROUTINGS:
            bad("routing", f"must be one of {', '.join(ROUTINGS)}")
        if self.topk == 1 and (self.routing != "softmax_topk" or self.renormalize):
            # a softmax over the one chosen logit, or one renormalised weight, is always 1: the
            # router would get no gradient (megatron-core refuses it too)
            bad("topk", "needs routing=softmax_topk and renormalize=false (a single expert's "
                "weight would otherwise always be 1)")
        if self.adapter_activation not in ACTIVATIONS:
            bad("adapter_activation", f"must be one of {', '.join(ACTIVATIONS)}")
        if self.dispatcher not in DISPATCHERS:
            bad("dispatcher", f"must be one of {', '.join(DISPATCHERS)}")
        if self.aux_loss_coeff < 0 or self.z_loss_coeff < 0:
            bad("aux_loss_coeff" if self.aux_loss_coeff < 0 else "z_loss_coeff", "must be >= 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            bad("capacity_factor", "must be > 0 (or null for dropless)")


# The Hugging Face projections LoRA can target (PEFT's target_modules names) and the
# megatron-core linear each lives in (model/lora.py), in the order of the linear's output rows.
LORA_LINEAR_OF = {"q_proj": "linear_qkv", "k_proj": "linear_qkv", "v_proj": "linear_qkv",
                  "o_proj": "linear_proj", "gate_proj": "linear_fc1", "up_proj": "linear_fc1",
                  "down_proj": "linear_fc2"}
LORA_TARGETS = tuple(LORA_LINEAR_OF)
# The Hugging Face projections of each megatron-core linear, in the order of its output rows.
LINEAR_TARGETS = {linear: tuple(t for t, of in LORA_LINEAR_OF.items() if of == linear)
                  for linear in dict.fromkeys(LORA_LINEAR_OF.values())}
# Column-parallel linears split their output over TP; the others (row-parallel) their input.
COLUMN_PARALLEL_LINEARS = ("linear_qkv", "linear_fc1")
ATTENTION_LINEARS = ("linear_qkv", "linear_proj")


def lora_column_parallel(target: str) -> bool:
    return LORA_LINEAR_OF[target] in COLUMN_PARALLEL_LINEARS


@dataclass
class LoRAConfig:
    """LoRA on the frozen base beside the adapter experts (the paper: all seven projections,
    rank 64, alpha 16, dropout 0.1). No targets: no LoRA."""

    SECTION: ClassVar[str] = "lora"
    targets: list = dataclasses.field(default_factory=list)
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.1

    def __post_init__(self):
        if not isinstance(self.targets, list) or not all(isinstance(t, str)
                                                         for t in self.targets):
            raise invalid(self.SECTION, self, "targets", "expected a list of projection names "
                          f"({', '.join(LORA_TARGETS)})")
        for t in self.targets:
            if t not in LORA_TARGETS:
                raise ConfigError(f"lora.targets: {t!r} matches no module (the projections "
                                  f"are {', '.join(LORA_TARGETS)})")
        if len(set(self.targets)) != len(self.targets):
            raise invalid(self.SECTION, self, "targets", "a projection is listed twice")
        if self.rank <= 0:
            raise invalid(self.SECTION, self, "rank", "must be >= 1")
        if self.alpha <= 0:
            raise invalid(self.SECTION, self, "alpha", "must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise invalid(self.SECTION, self, "dropout", "must be in [0, 1)")

    @property
    def enabled(self) -> bool:
        return bool(self.targets)

    def shape(self) -> dict:
        """The settings that fix LoRA's weights (dropout may change between runs)."""
        return dict(targets=sorted(self.targets), rank=self.rank, alpha=self.alpha)


def lora_shapes(m: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each LoRA target projection."""
    q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    h, f = m.hidden_size, m.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}


def validate_lora(lora: LoRAConfig, m: ModelConfig) -> None:
    """Checks that the LoRA rank fits every target projection of model `m`."""
    for t in lora.targets:
        fan_in, fan_out = lora_shapes(m)[t]
        if lora.rank > min(fan_in, fan_out):
            raise ConfigError(f"lora.rank={lora.rank}: larger than {t} ({fan_in} inputs, "
                              f"{fan_out} outputs); use at most {min(fan_in, fan_out)}")
