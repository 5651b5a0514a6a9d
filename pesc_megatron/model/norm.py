"""torch norms for the local spec that, unlike megatron-core's WrappedTorchNorm, allow sequence
parallelism: the weights are marked `sequence_parallel`, so megatron-core all-reduces their
gradients over the tensor-parallel group (each rank normalises a different slice of tokens)."""
import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class SequenceParallelTorchNorm:
    """Builds torch.nn.RMSNorm or LayerNorm with megatron-core's norm signature."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {config.normalization!r}: use RMSNorm or LayerNorm")
        norm.to(dtype=config.params_dtype)
        for p in norm.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)
        return norm
