"""Hugging Face modeling code for PESC models in the released Camelidae layout (exported next to checkpoints)."""

from .configuration_camelidae import CamelidaeConfig
from .modeling_camelidae import CamelidaeForCausalLM, CamelidaeModel, CamelidaePreTrainedModel


def register_auto_classes():
    """Make AutoConfig / AutoModelForCausalLM resolve model_type "camelidae" to these classes (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register("camelidae", CamelidaeConfig, exist_ok=True)
    AutoModelForCausalLM.register(CamelidaeConfig, CamelidaeForCausalLM, exist_ok=True)


__all__ = [
    "CamelidaeConfig",
    "CamelidaeForCausalLM",
    "CamelidaeModel",
    "CamelidaePreTrainedModel",
    "register_auto_classes",
]
