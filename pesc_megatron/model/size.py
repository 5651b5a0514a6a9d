"""Parameter counts of a PESC model from its settings alone (no model is built), and the dense
architectures of the paper's runs. `pesc info` prints them; tests check them against built
models."""
from __future__ import annotations

from pesc_megatron.model.config import LoRAConfig, ModelConfig, PESCConfig, lora_shapes

# Hugging Face configs of the paper's bases (and the quickstart's), as ModelConfig.
PRESETS = {
    "llama2-7b": ModelConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                             max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama2-13b": ModelConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                              num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                              max_position_embeddings=4096, rms_norm_eps=1e-5),
    "yi-34b": ModelConfig(hidden_size=7168, intermediate_size=20480, num_hidden_layers=60,
                          num_attention_heads=56, num_key_value_heads=8, vocab_size=64000,
                          max_position_embeddings=4096, rope_theta=5e6, rms_norm_eps=1e-5),
    "smollm2-135m": ModelConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                max_position_embeddings=8192, rope_theta=1e5,
                                tie_word_embeddings=True),
}


def count_parameters(m: ModelConfig, p: PESCConfig, lora: LoRAConfig | None = None) -> dict:
    """Parameters of the whole model (all ranks together), by part: `dense` is the source
    model (frozen), then the trainable `routers`, `adapters` and `lora`."""
    h, f, layers = m.hidden_size, m.intermediate_size, m.num_hidden_layers
    q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    attention = h * (q + 2 * kv) + q * h + (q + 2 * kv if m.attention_bias else 0)
    per_layer = attention + 3 * h * f + 2 * h  # + the two RMSNorm weights
    embeddings = m.vocab_size * h * (1 if m.tie_word_embeddings else 2)
    counts = dict(
        dense=embeddings + layers * per_layer + h,  # + the final norm
        routers=layers * p.num_experts * h,
        adapters=layers * p.num_experts * 2 * h * p.adapter_dim,
        lora=0,
    )
    if lora is not None and lora.enabled:
        shapes = lora_shapes(m)
        counts["lora"] = layers * sum(lora.rank * sum(shapes[t]) for t in lora.targets)
    counts["trainable"] = counts["routers"] + counts["adapters"] + counts["lora"]
    counts["total"] = counts["dense"] + counts["trainable"]
    return counts
