"""The parallel layout (`ParallelConfig`) and the one check that it fits a model and a world
size; `data_parallel_size` is the one place the DP size is derived."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from pesc_megatron.model.config import ModelConfig, PESCConfig
from pesc_megatron.schema import ConfigError, invalid


@dataclass
class ParallelConfig:
    """megatron-core's model-parallel sizes; data parallelism is the rest of the world."""

    SECTION: ClassVar[str] = "parallel"
    tp: int = 1  # tensor parallel: attention heads, FFN width, vocabulary
    pp: int = 1  # pipeline parallel: layers
    sequence_parallel: Optional[bool] = None  # None: on whenever tp > 1 (MoE requires it)
    ep: int = 1  # expert parallel: the adapter experts
    etp: int = 1  # expert tensor parallel: each adapter's width

    def __post_init__(self):
        for key in ("tp", "pp", "ep", "etp"):
            if getattr(self, key) < 1:
                raise invalid(self.SECTION, self, key, "must be >= 1")
        if self.sequence_parallel is None:
            self.sequence_parallel = self.tp > 1
        if self.tp > 1 and not self.sequence_parallel:
            raise ConfigError(
                f"parallel.sequence_parallel=false with parallel.tp={self.tp}: megatron-core's "
                "MoE layer needs sequence parallelism whenever tp > 1")


def data_parallel_size(par: ParallelConfig, world_size: int) -> int:
    """Ranks that hold the same model part: the world over TP x PP (megatron-core's DP)."""
    return world_size // (par.tp * par.pp)


def expert_data_parallel_size(par: ParallelConfig, world_size: int) -> int:
    """Ranks that hold the same experts: the world over EP x ETP x PP."""
    return world_size // (par.ep * par.etp * par.pp)


def splits_over_tp(par: ParallelConfig, seq_length: int) -> bool:
    """Sequence parallelism splits every sequence over the TP ranks: it must divide evenly."""
    return not par.sequence_parallel or seq_length % par.tp == 0


def validate_layout(m: ModelConfig, p: PESCConfig, par: ParallelConfig,
                    world_size: Optional[int] = None) -> None:
    """Checks that the parallel sizes fit the model and the world; one line per problem."""
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
