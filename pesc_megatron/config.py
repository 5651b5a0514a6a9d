"""Typed settings: the dense architecture, the PESC method, and the parallel layout.

Each section is a dataclass. `from_dict` rejects unknown keys and wrong types with one line that
names the key; `validate_layout` checks the parallel sizes against the model before any work.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Optional


class ConfigError(ValueError):
    """A user-caused configuration error; its message is one line naming the key and value."""


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
    rms_norm_eps: float = 1e-5
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


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    sequence_parallel: Optional[bool] = None  # None: on whenever tp > 1 (MoE requires it)

    def __post_init__(self):
        if self.sequence_parallel is None:
            self.sequence_parallel = self.tp > 1


def _check_type(where: str, name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}{name}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls, values: dict, where: str = ""):
    """Builds dataclass `cls` from `values`; unknown keys and wrong types are a ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{where}{unknown[0]}: unknown option (known: {', '.join(sorted(names))})")
    return cls(**{k: _check_type(where, k, v, hints[k]) for k, v in values.items()})


def validate_pesc(p: PESCConfig) -> None:
    def bad(key, msg):
        raise ConfigError(f"pesc.{key}={getattr(p, key)!r}: {msg}")

    if p.num_experts < 1:
        bad("num_experts", "must be >= 1")
    if not 1 <= p.topk <= p.num_experts:
        bad("topk", f"must be between 1 and num_experts={p.num_experts}")
    if p.adapter_dim < 1:
        bad("adapter_dim", "must be >= 1")
    if not 0.0 <= p.adapter_dropout < 1.0:
        bad("adapter_dropout", "must be in [0, 1)")
    if p.routing not in ROUTINGS:
        bad("routing", f"must be one of {', '.join(ROUTINGS)}")
    if p.adapter_activation not in ACTIVATIONS:
        bad("adapter_activation", f"must be one of {', '.join(ACTIVATIONS)}")
    if p.dispatcher not in DISPATCHERS:
        bad("dispatcher", f"must be one of {', '.join(DISPATCHERS)}")
    if p.aux_loss_coeff < 0 or p.z_loss_coeff < 0:
        bad("aux_loss_coeff" if p.aux_loss_coeff < 0 else "z_loss_coeff", "must be >= 0")
    if p.capacity_factor is not None and p.capacity_factor <= 0:
        bad("capacity_factor", "must be > 0 (or null for dropless)")


def validate_layout(m: ModelConfig, p: PESCConfig, par: ParallelConfig,
                    world_size: Optional[int] = None) -> None:
    """Checks that the parallel sizes fit the model and the world; one line per problem."""
    validate_pesc(p)
    for key in ("tp", "pp", "ep", "etp"):
        if getattr(par, key) < 1:
            raise ConfigError(f"parallel.{key}={getattr(par, key)}: must be >= 1")
    checks = [
        ("tp", par.tp, "model.num_attention_heads", m.num_attention_heads),
        ("tp", par.tp, "model.num_key_value_heads", m.num_key_value_heads),
        ("tp", par.tp, "model.intermediate_size", m.intermediate_size),
        ("tp", par.tp, "model.vocab_size", m.vocab_size),
        ("pp", par.pp, "model.num_hidden_layers", m.num_hidden_layers),
        ("ep", par.ep, "pesc.num_experts", p.num_experts),
        ("etp", par.etp, "pesc.adapter_dim", p.adapter_dim),
    ]
    for key, size, what, value in checks:
        if value % size:
            raise ConfigError(f"parallel.{key}={size} does not divide {what}={value}")
    if par.tp > 1 and not par.sequence_parallel:
        raise ConfigError(
            f"parallel.sequence_parallel=false with parallel.tp={par.tp}: megatron-core's MoE "
            "layer needs sequence parallelism whenever tp > 1")
    if world_size is not None:
        model_parallel = par.tp * par.pp
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tp*parallel.pp="
                f"{model_parallel}")
        expert_parallel = par.ep * par.etp * par.pp
        if world_size % expert_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.ep*parallel.etp*"
                f"parallel.pp={expert_parallel}")
