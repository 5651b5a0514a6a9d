"""Builds megatron-core's GPTModel with PESC layers from a Hugging Face-style architecture."""
from __future__ import annotations

import os
import shutil

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from pesc_megatron.model.attention import resolve_attention
from pesc_megatron.model.config import LoRAConfig, ModelConfig, PESCConfig, validate_lora
from pesc_megatron.model.pesc_layer import PESCTransformerConfig
from pesc_megatron.model.precision import PrecisionConfig
from pesc_megatron.model.roles import freeze_base
from pesc_megatron.model.spec import get_pesc_block_spec
from pesc_megatron.parallel.config import ParallelConfig, validate_layout
from pesc_megatron.parallel.distributed import device

# PESCConfig settings the layers read from their TransformerConfig as `pesc_<name>`.
PESC_LAYER_FIELDS = ("adapter_scaling", "adapter_dropout", "adapter_activation")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
           "fp64": torch.float64}


def fused_swiglu_runs() -> bool:
    """megatron-core's fused SwiGLU is `torch.compile`d (megatron.core.jit): on CPU that needs
    a C++ compiler for inductor's kernels; without one the unfused SwiGLU runs."""
    return torch.cuda.is_available() or any(
        shutil.which(cc) for cc in (os.environ.get("CXX", "c++"), "g++", "clang++"))


def te_fp8_fields(precision: PrecisionConfig | None) -> dict:
    """megatron-core's TransformerConfig fields for Transformer Engine's FP8 (`precision.fp8`,
    GPU only). Format `hybrid`: e4m3 in the forward, e5m2 for gradients, as Megatron-LM trains."""
    if precision is None or precision.fp8 is None:
        return {}
    return dict(fp8="hybrid", fp8_recipe=precision.fp8, fp8_margin=precision.fp8_margin,
                fp8_amax_history_len=precision.fp8_amax_history_len)


def transformer_config(model: ModelConfig, pesc: PESCConfig, parallel: ParallelConfig,
                       dtype: str = "fp32", initialize: bool = True,
                       recompute: str = "none",
                       lora: LoRAConfig | None = None,
                       precision: PrecisionConfig | None = None,
                       attention: str = "auto",
                       experts: str = "grouped") -> PESCTransformerConfig:
    """The single megatron-core config for the model (Llama-family defaults: no dropout).
    `initialize=False` skips the random init of the frozen base (it is about to be loaded);
    routers and adapters are always initialised (see pesc_layer). `recompute`: none, selective
    (core attention, megatron-core's default modules) or full (every layer's activations).
    `lora`: LoRA on the frozen base's projections (None: none). `precision`: its Transformer
    Engine FP8 settings (`precision.frozen_weights` applies after loading, see model/fp8.py).
    `attention`: the core attention (model/attention.py: auto, sdpa, local, te); `experts`:
    how the adapter experts compute (model/pesc_layer.py: grouped, sequential)."""
    validate_layout(model, pesc, parallel)
    lora = lora or LoRAConfig()
    validate_lora(lora, model)
    params_dtype = DTYPES[dtype]
    recompute_options = {} if recompute == "none" else dict(recompute_granularity=recompute)
    if recompute == "full":
        recompute_options.update(recompute_method="uniform", recompute_num_layers=1)
    return PESCTransformerConfig(
        **recompute_options,
        **te_fp8_fields(precision),
        num_layers=model.num_hidden_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.intermediate_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_key_value_heads,
        kv_channels=model.head_dim,
        layernorm_epsilon=model.rms_norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        # megatron-core's SwiGLU function: keeps only the fc1 output for backward (its
        # unfused glu also keeps silu(gate) and a copy of up: 2 x [tokens, ffn] more a layer)
        bias_activation_fusion=fused_swiglu_runs(),
        add_bias_linear=False,
        add_qkv_bias=model.attention_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=initialize,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=params_dtype,
        num_moe_experts=pesc.num_experts,
        moe_router_topk=pesc.topk,
        moe_router_pre_softmax=pesc.routing == "softmax_topk" and not pesc.renormalize,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=pesc.aux_loss_coeff,
        moe_z_loss_coeff=pesc.z_loss_coeff or None,
        moe_expert_capacity_factor=pesc.capacity_factor,
        moe_token_dispatcher_type=pesc.dispatcher,
        moe_ffn_hidden_size=pesc.adapter_dim,
        moe_shared_expert_intermediate_size=model.intermediate_size,
        **{f"pesc_{k}": getattr(pesc, k) for k in PESC_LAYER_FIELDS},
        pesc_lora_targets=tuple(lora.targets),
        **{f"pesc_lora_{k}": getattr(lora, k) for k in ("rank", "alpha", "dropout")},
        pesc_attention=resolve_attention(attention),
        pesc_experts=experts,
    )


class PESCGPTModel(GPTModel):
    """megatron-core's GPTModel whose output layer runs only at the positions `loss_mask`
    selects: the output layer and the cross entropy over the vocabulary are a large part of a
    step for small models, and prompt and pad positions carry no loss.
    - With labels and `loss_mask` (training): the [b, s] token loss, 0 where the mask is 0.
    - With `loss_mask` and no labels (scoring, harness/forward.py): the logits at the mask's
      positions, [n, vocab / TP] in (batch, position) order.
    - Without `loss_mask`: GPTModel's forward unchanged."""

    def _postprocess(self, hidden_states, labels=None, loss_mask=None, **kwargs):
        if loss_mask is None or not self.post_process or self.mtp_process \
                or self.config.mtp_num_layers is not None:
            return super()._postprocess(hidden_states, labels=labels, loss_mask=loss_mask,
                                        **kwargs)
        keep = loss_mask.t().bool()  # [s, b], the layout of hidden_states
        if labels is None:
            return self._logits_at(hidden_states, keep, batch_major=True)[:, 0]
        logits = self._logits_at(hidden_states, keep)
        loss = self.compute_language_model_loss(labels.t()[keep].unsqueeze(0), logits)
        return torch.zeros(keep.shape, dtype=loss.dtype, device=loss.device).masked_scatter(
            keep, loss[0]).t()

    def _logits_at(self, hidden_states, keep, batch_major: bool = False):
        """The output layer at the [s, b] positions `keep` of hidden_states: [n, 1, vocab/TP],
        in (position, batch) order, or (batch, position) with `batch_major`."""
        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else None)
        layer = self.output_layer

        def select(h):
            return h.transpose(0, 1)[keep.t()] if batch_major else h[keep]

        if not layer.sequence_parallel:
            return layer(select(hidden_states).unsqueeze(1), weight=weight)[0]
        # The sequence is split over the TP ranks: gather it (backward: this rank's slice
        # of the gradient), select, and run the layer as a TP layer without SP, whose
        # backward all-reduces the input gradient (the FP8 outlier hook follows the flag).
        full = gather_from_sequence_parallel_region(hidden_states, False, self.pg_collection.tp)
        layer.sequence_parallel, layer.allreduce_dgrad = False, True
        try:
            return layer(select(full).unsqueeze(1), weight=weight)[0]
        finally:
            layer.sequence_parallel, layer.allreduce_dgrad = True, False


def build_model(model: ModelConfig, pesc: PESCConfig, parallel: ParallelConfig,
                dtype: str = "fp32", pre_process: bool | None = None,
                post_process: bool | None = None, initialize: bool = True,
                recompute: str = "none", lora: LoRAConfig | None = None,
                precision: PrecisionConfig | None = None, attention: str = "auto",
                experts: str = "grouped") -> PESCGPTModel:
    """One pipeline stage of the PESC GPTModel, frozen except routers, adapters and LoRA.
    With `precision.fp8` (Transformer Engine, GPU only) the base's linears are TE's.

    Needs `parallel_state` initialised with the same layout (parallel.distributed.initialize)."""
    config = transformer_config(model, pesc, parallel, dtype, initialize, recompute, lora,
                                precision, attention, experts)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    gpt = PESCGPTModel(
        config=config,
        transformer_layer_spec=get_pesc_block_spec(config),
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=model.rope_theta,
        rope_scaling=model.rope_scaling_factor is not None,
        rope_scaling_factor=model.rope_scaling_factor or 8.0,
    )
    gpt.to(device())  # torch norms and buffers are made on the CPU, megatron's layers on the GPU
    freeze_base(gpt)
    if recompute == "full" and pre_process:
        # Full recompute wraps each layer in a reentrant autograd Function, whose output needs
        # grad only if an input does; the frozen embedding's output does not, so without this
        # no gradient would reach the routers and adapters (as with PEFT's
        # enable_input_require_grads).
        gpt.embedding.register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    return gpt
