"""`pesc plan`: the memory one GPU needs to train a PESC model at a parallel layout, from the
settings alone, and a suggested layout that fits.

Per GPU (the pipeline stage that needs the most), as megatron-core allocates it:
- the frozen base (embeddings, attention, shared SwiGLU FFN, norms, output layer unless tied),
  split by TP and, by layers, by PP; with --frozen-weights fp8 every frozen weight matrix
  takes 1 byte plus an fp32 scale per row, with nf4 half a byte plus NF4's scales (see
  `nf4_bytes`), as `precision.frozen_weights` stores them by default (with the output layer's
  32 high-precision columns and, for nf4, 16 exact input columns per layer linear:
  `precision.output_outliers`, `precision.linear_outliers`; `tests/analysis/test_plan_layouts.py`
  checks both against the converted model);
- trainable routers (fp32, replicated), adapters (split by EP and ETP) and LoRA (A or B split
  by TP like the base, the other replicated), their fp32 gradient buffer and the optimizer
  state (fp32 master copy of bf16 weights + Adam m and v), which the distributed optimizer
  shards over the data-parallel group (the expert-data-parallel group for the adapters);
- activations: what backward keeps of every layer for each micro-batch in flight (1, or PP on
  the first stage of 1F1B), attention's score buffer, plus the largest transient of the step;
- a fixed runtime term per device kind.
The last stdout line is JSON. Formulas and the measured accuracy: docs/planner.md.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pesc_megatron.model.config import (
    LINEAR_TARGETS,
    LORA_LINEAR_OF,
    LoRAConfig,
    ModelConfig,
    PESCConfig,
    lora_column_parallel,
    lora_shapes,
)
from pesc_megatron.model.precision import NF4_BLOCK_SIZE, PrecisionConfig, scaler_block_size
from pesc_megatron.parallel.config import (
    ParallelConfig,
    data_parallel_size,
    expert_data_parallel_size,
    splits_over_tp,
    validate_layout,
)
from pesc_megatron.schema import ConfigError

GiB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
# What a process holds besides tensors. GPU: CUDA context and kernels, cuBLAS workspaces, NCCL
# communicators: an assumed constant, not yet measured on a GPU. CPU: the resident size after
# imports and initialize(), measured by `pesc bench memory` in each process it runs.
GPU_RUNTIME_BYTES = 3 * GiB
HEADROOM = 0.10  # a suggestion leaves this share of the GPU free (fragmentation, spikes)
RECOMPUTE_LEVELS = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    world: int = 1

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(tp=self.tp, pp=self.pp, ep=self.ep, etp=self.etp)

    @property
    def dp(self) -> int:
        return data_parallel_size(self.parallel, self.world)

    @property
    def expert_dp(self) -> int:
        return expert_data_parallel_size(self.parallel, self.world)


@dataclass(frozen=True)
class Job:
    """What is trained and how: the settings memory depends on."""
    model: ModelConfig
    pesc: PESCConfig
    lora: LoRAConfig
    seq: int = 4096
    micro_batch: int = 1
    dtype: str = "bf16"
    frozen_weights: str | None = None  # None: dtype; fp8 or nf4 (precision.frozen_weights)
    distributed_optimizer: bool = True
    recompute: str = "none"
    attention: str = "sdpa"  # sdpa (fused: no s^2 term) or local (megatron-core's unfused)
    experts: str = "grouped"  # grouped (stacked weights kept for backward) or sequential
    packed: bool = True  # packed (THD) micro-batches, as `pesc train` runs


# ------------------------------------------------------------------------------------------
# Parameters, gradients, optimizer state (per GPU, on pipeline stage `stage`)
# ------------------------------------------------------------------------------------------
def _layers(job: Job, lay: Layout) -> int:
    return job.model.num_hidden_layers // lay.pp


def frozen_bytes(job: Job, lay: Layout, stage: int) -> int:
    """The frozen base on this GPU: layer weights split by TP; norms replicated; the embedding
    on the first stage; the final norm and the output layer on the last (tied embeddings need
    their own copy there only when PP > 1)."""
    m, a = job.model, DTYPE_BYTES[job.dtype]
    h, f, v, tp = m.hidden_size, m.intermediate_size, m.vocab_size, lay.tp
    q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim

    def matrix(rows: int, cols: int, layer: bool = True) -> int:
        if job.frozen_weights == "nf4":  # a layer's linears keep some columns exact (+ index)
            kept = min(PrecisionConfig().linear_outliers, cols) if layer else 0
            return nf4_bytes(rows * cols, a) + kept * (rows * a + 8)
        # FP8: 1 byte each + an fp32 scale per row
        return rows * cols + 4 * rows if job.frozen_weights == "fp8" else rows * cols * a

    per_layer = (matrix((q + 2 * kv) // tp, h) + matrix(h, q // tp)  # qkv, proj
                 + matrix(2 * f // tp, h) + matrix(h, f // tp)  # fc1 (gate, up), fc2
                 + ((q + 2 * kv) // tp if m.attention_bias else 0) * a + 2 * h * a)
    total = _layers(job, lay) * per_layer
    table = matrix(v // tp, h, layer=False)
    if stage == 0:
        total += table
    if stage == lay.pp - 1:
        total += h * a + (table if not m.tie_word_embeddings or lay.pp > 1 else 0)
        if job.frozen_weights:  # the output layer's columns kept in the model dtype (+ index)
            total += PrecisionConfig().output_outliers * ((v // tp) * a + 8)
    return total


def nf4_bytes(numel: int, dtype_bytes: int) -> int:
    """An NF4 weight of `numel` values (model/nf4.py): 4 bits each, an int8 absmax per block
    of 64, a scale per group of absmaxes, their mean and the 16 levels in the model dtype."""
    blocks = numel // NF4_BLOCK_SIZE
    return (numel // 2 + blocks + dtype_bytes * (blocks // scaler_block_size(numel))
            + dtype_bytes * 17)


def trainable_counts(job: Job, lay: Layout) -> dict[str, int]:
    """Trainable parameters on one GPU (every stage holds the same number of layers)."""
    m, p, lora = job.model, job.pesc, job.lora
    h, layers = m.hidden_size, _layers(job, lay)
    lora_per_layer = 0
    if lora.enabled:
        shapes = lora_shapes(m)
        for target in lora.targets:
            fan_in, fan_out = shapes[target]
            if lora_column_parallel(target):  # A replicated, B split on its output
                lora_per_layer += lora.rank * (fan_in + fan_out // lay.tp)
            else:  # A split on its input, B replicated
                lora_per_layer += lora.rank * (fan_in // lay.tp + fan_out)
    return dict(routers=layers * p.num_experts * h,
                adapters=layers * (p.num_experts // lay.ep) * 2 * h * p.adapter_dim // lay.etp,
                lora=layers * lora_per_layer)


def trainable_bytes(job: Job, counts: dict[str, int]) -> int:
    """Routers are fp32 in every dtype; adapters and LoRA take the model's dtype."""
    return 4 * counts["routers"] + DTYPE_BYTES[job.dtype] * (counts["adapters"] + counts["lora"])


def gradient_bytes(counts: dict[str, int]) -> int:
    """megatron-core DDP's buffer: an fp32 gradient per trainable parameter (full size even with
    the distributed optimizer, which reduce-scatters it)."""
    return 4 * sum(counts.values())


def optimizer_bytes(job: Job, lay: Layout, counts: dict[str, int]) -> float:
    """Adam's m and v (fp32) and, for weights not in fp32, an fp32 master copy; the distributed
    optimizer shards them over the data-parallel group (expert-data-parallel for adapters).
    Means over the group: shards differ by the buffers' padding, a few hundred elements."""
    master = 4 if job.dtype != "fp32" else 0
    dense_group = lay.dp if job.distributed_optimizer else 1
    expert_group = lay.expert_dp if job.distributed_optimizer else 1
    return (8 * counts["routers"] / dense_group + (8 + master) * counts["lora"] / dense_group
            + (8 + master) * counts["adapters"] / expert_group)


# ------------------------------------------------------------------------------------------
# Activations (per GPU and micro-batch). Each term is what autograd keeps for backward,
# checked tensor by tensor on CPU (docs/planner.md). t = tokens of a micro-batch; with TP the
# sequence is split (sequence parallelism) outside attention and the FFN, the heads and the
# FFN width inside them.
# ------------------------------------------------------------------------------------------
def routing_bytes(p: PESCConfig) -> int:
    """Per token: router probabilities and masks (fp32, bool) and top-k indices (int64)."""
    return 9 * p.num_experts + 24 * p.topk


def _qkv_elements(m: ModelConfig, recompute: str, attention: str = "local") -> int:
    """Per token, what attention keeps of q, k, v (before the TP split). The local attention
    without recompute: q and k after RoPE; with GQA the k and v repeated to every query head,
    without it v is a view that keeps the whole fused qkv output alive. Selective recompute
    keeps the core attention's inputs: q and k after RoPE and v, still a view of the fused
    output. The fused attention keeps q and k after RoPE, a copy of v (so the fused output
    goes) and its output; with selective recompute the checkpoint keeps its inputs as passed
    (v a view of the fused output)."""
    q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    inputs = q + kv + (q + 2 * kv)
    if attention != "local":
        return inputs if recompute == "selective" else q + 2 * kv + q
    if recompute == "selective" or q == kv:
        return inputs
    return 3 * q


def softmax_bytes(dtype: str) -> int:
    """Per attention score: the fp32 softmax output, plus its copy in the model's dtype."""
    return 4 + (DTYPE_BYTES[dtype] if dtype != "fp32" else 0)


def layer_activations(job: Job, lay: Layout, core_attention: bool = True,
                      post_attention: bool = True, ffn: bool = True) -> float:
    """Bytes one layer keeps for backward, for one micro-batch, without full recompute.
    The flags say which parts sit behind a trainable weight: nothing before the first one
    needs a gradient (the first layer of the first stage, without LoRA, keeps only what the
    router and the experts read)."""
    m, p, lora = job.model, job.pesc, job.lora
    a = DTYPE_BYTES[job.dtype]
    h, f, s = m.hidden_size, m.intermediate_size, job.seq
    t = job.seq * job.micro_batch
    local = t / lay.tp  # this rank's sequence shard
    heads = m.num_attention_heads // lay.tp
    # Residual stream read by the next RMSNorms (the MLP's output always needs a gradient),
    # the router's input and routing bookkeeping.
    total = ((1 + post_attention) * h * a + h * a + routing_bytes(p)) * local
    if core_attention:
        total += _qkv_elements(m, job.recompute, job.attention) // lay.tp * a * t
        if job.recompute == "none" and job.attention == "local":
            total += heads * s * softmax_bytes(job.dtype) * t
        elif job.recompute == "none":  # the fused kernel's fp32 logsumexp per head
            total += heads * 4 * t
    # SwiGLU (megatron-core's fused function): the fc1 output (gate, up) only. A CPU without a
    # C++ compiler runs the unfused one (builder.fused_swiglu_runs), which keeps 2F more.
    if ffn:
        total += 2 * f // lay.tp * a * t
    # Adapters, on the k tokens-per-token routed here (balanced routing; ETP gathers its group's
    # tokens): dropped input (+ bool mask), fc1 output, GELU, GELU times the routing weight.
    mask = 1 if p.adapter_dropout > 0 and ffn else 0
    rows = p.topk * local * lay.etp
    total += rows * (h * (a + mask) + 3 * p.adapter_dim // lay.etp * a)
    if job.experts == "grouped":  # the local experts' weights, stacked for the grouped GEMMs
        total += 2 * p.num_experts // lay.ep * p.adapter_dim // lay.etp * h * a
    if lora.enabled:
        total += _lora_activations(job, lay, core_attention)
    return total


def _lora_activations(job: Job, lay: Layout, core_attention: bool = True) -> float:
    """Per layer: each target's 1-byte dropout mask and rank-r A output, and each input the
    targets read, once, where nothing else keeps it already (model/lora.py keeps the input and
    the masks, not the dropped inputs; the frozen base's linears keep no input). q, k, v share
    the input norm's output; o_proj reads the core attention's output, which the fused
    attention keeps when it needs a gradient, without recompute, on unpacked batches (a packed
    batch's output is the samples' outputs concatenated, a new tensor); gate and up read the
    router's input (counted); down_proj reads the SwiGLU output, which the fused SwiGLU
    recomputes. Column targets read the sequence shard and their A output is gathered over the
    sequence; row targets read a hidden shard and their A output is reduce-scattered."""
    m, lora, a = job.model, job.lora, DTYPE_BYTES[job.dtype]
    t, r = job.seq * job.micro_batch, lora.rank
    shapes = lora_shapes(m)
    total = 0.0
    kept = {"linear_fc1"}
    if (core_attention and job.attention != "local" and job.recompute == "none"
            and not job.packed):
        kept.add("linear_proj")
    for target in lora.targets:
        fan_in = shapes[target][0]
        if lora_column_parallel(target):
            tokens, in_part, out_tokens = t / lay.tp, fan_in, t
        else:
            tokens, in_part, out_tokens = t, fan_in // lay.tp, t / lay.tp
        if lora.dropout > 0:
            total += tokens * in_part
        if LORA_LINEAR_OF[target] not in kept:
            kept.add(LORA_LINEAR_OF[target])
            total += tokens * in_part * a
        total += out_tokens * r * a
    return total


def _first_layer_activations(job: Job, lay: Layout) -> float:
    """The first layer of the first stage: its parts before the first trainable weight keep
    nothing (without LoRA, only what the router and the experts read)."""
    targets = set(job.lora.targets)
    ffn_targets = set(LINEAR_TARGETS["linear_fc1"] + LINEAR_TARGETS["linear_fc2"])
    return layer_activations(job, lay,
                             core_attention=bool(targets & set(LINEAR_TARGETS["linear_qkv"])),
                             post_attention=bool(targets - ffn_targets),
                             ffn=bool(targets))


def stage_activations(job: Job, lay: Layout, stage: int) -> dict[str, float]:
    """`saved`: every in-flight micro-batch's layers (1F1B keeps pp - stage on a stage) and,
    with the local attention, its attention mask; `buffer`: the local attention's
    preallocated score buffer (megatron-core's);
    `transient`: the largest short-lived allocation (one layer's attention backward, with the
    layer being recomputed, or the loss on the last stage)."""
    m, a = job.model, DTYPE_BYTES[job.dtype]
    t, s = job.seq * job.micro_batch, job.seq
    layers = _layers(job, lay)
    scores = m.num_attention_heads // lay.tp * s * t  # attention scores of a layer
    if job.recompute == "full":  # each layer's input, the stage's output, the fp32 RoPE angles
        per_microbatch = (layers + 1) * m.hidden_size * a * t / lay.tp + 4 * s * m.head_dim
    else:
        per_microbatch = layers * layer_activations(job, lay)
        if stage == 0:
            per_microbatch += _first_layer_activations(job, lay) - layer_activations(job, lay)
    transient = 0.0
    if job.attention == "local":  # the unfused path's [s, s] terms; the fused one has none
        per_microbatch += job.micro_batch * s * s  # the bool mask of packed sequences
        transient = 8 * scores  # softmax backward: gradients of its output and input, fp32
        if job.recompute == "selective":  # + the recomputed probabilities
            transient += scores * softmax_bytes(job.dtype)
    else:
        scores = 0  # no score buffer either
    if job.recompute == "full":  # + the whole recomputed layer
        transient += layer_activations(dataclasses.replace(job, recompute="none"), lay)
    if stage == lay.pp - 1:  # the logits and the loss's fp32 softmax over the vocabulary
        transient = max(transient, t * m.vocab_size // lay.tp * softmax_bytes(job.dtype))
    saved = (lay.pp - stage) * per_microbatch
    if job.recompute != "full":
        # RoPE's cos and sin, made once per forward for all layers (model/rope.py): [s, d]
        # each, the same pair for every micro-batch. (Packed THD samples make [b * s, d] per
        # micro-batch instead: well under 0.1% of the activations, not counted.)
        saved += 2 * s * m.head_dim * a
    return dict(saved=saved, buffer=scores * a, transient=transient)


# ------------------------------------------------------------------------------------------
# One GPU, one layout
# ------------------------------------------------------------------------------------------
def stage_memory(job: Job, lay: Layout, stage: int, runtime: float) -> dict[str, float]:
    """Bytes by part on one GPU of pipeline stage `stage`; `runtime` is the device's fixed term."""
    counts = trainable_counts(job, lay)
    acts = stage_activations(job, lay, stage)
    parts = dict(frozen=frozen_bytes(job, lay, stage), trainable=trainable_bytes(job, counts),
                 gradients=gradient_bytes(counts), optimizer=optimizer_bytes(job, lay, counts),
                 activations=sum(acts.values()), runtime=runtime)
    parts["total"] = sum(parts.values())
    return parts


def per_gpu(job: Job, lay: Layout, runtime: float = GPU_RUNTIME_BYTES) -> dict:
    """The stage that needs the most: the first (embedding, most micro-batches in flight) or
    the last (output layer, loss); middle stages need less than the first."""
    stages = {0, lay.pp - 1}
    worst = max(stages, key=lambda st: stage_memory(job, lay, st, runtime)["total"])
    return dict(stage=worst, **stage_memory(job, lay, worst, runtime))


# ------------------------------------------------------------------------------------------
# Searching layouts
# ------------------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_error(job: Job, lay: Layout) -> str | None:
    """Why megatron-core could not run this layout (None: it can)."""
    try:
        validate_layout(job.model, job.pesc, lay.parallel, lay.world)
    except ConfigError as e:
        return str(e)
    if not splits_over_tp(lay.parallel, job.seq):
        return f"--seq {job.seq} is not divisible by tp={lay.tp} (sequence parallelism)"
    return None


def candidates(job: Job, world: int, gpus_per_node: int, fixed: dict) -> list[Layout]:
    """Valid layouts: TP within a node, ETP 1 (adapters are small) unless fixed, EP dividing
    the experts, PP dividing the layers; data parallelism is the rest of the world."""
    def sizes(key, default):
        return [fixed[key]] if key in fixed else default

    out = []
    for tp in sizes("tp", [d for d in _divisors(gpus_per_node) if world % d == 0]):
        for pp in sizes("pp", _divisors(job.model.num_hidden_layers)):
            for ep in sizes("ep", _divisors(job.pesc.num_experts)):
                for etp in sizes("etp", [1]):
                    lay = Layout(tp, pp, ep, etp, world)
                    if layout_error(job, lay) is None:
                        out.append(lay)
    return out


def preference(lay: Layout, recompute: str, total: float) -> tuple:
    """Least model parallelism first, each step in order of what it costs a PESC step: PP
    (pipeline bubbles), full recompute (a second forward), TP (collectives around attention
    and the FFN of every layer), EP (two all-to-alls per layer that cannot overlap: the experts
    wait for the frozen FFN), selective recompute (attention scores only), ETP; then the
    smaller memory."""
    return (lay.pp, recompute == "full", lay.tp, lay.ep, recompute == "selective", lay.etp,
            total)


def suggest(job: Job, layouts: list[Layout], gpu_bytes: float, recompute_levels,
            runtime: float = GPU_RUNTIME_BYTES):
    """(layout, recompute, memory) of the preferred layout that leaves HEADROOM free, or of the
    one that needs the least memory when none does; and whether it fits with headroom."""
    options = []
    for recompute in recompute_levels:
        trial = dataclasses.replace(job, recompute=recompute)
        for lay in layouts:
            options.append((lay, recompute, per_gpu(trial, lay, runtime)))
    fitting = [o for o in options if o[2]["total"] <= (1 - HEADROOM) * gpu_bytes]
    if fitting:
        return min(fitting, key=lambda o: preference(o[0], o[1], o[2]["total"])), True
    return min(options, key=lambda o: o[2]["total"]), False
