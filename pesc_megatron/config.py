"""Typed settings: the dense architecture, the PESC method, and the parallel layout.

Each section is a dataclass. `from_dict` rejects unknown keys and wrong types with one line that
names the key; `validate_layout` checks the parallel sizes against the model before any work.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
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


# The Hugging Face projections LoRA can target (PEFT's target_modules names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    """LoRA on the frozen base beside the adapter experts (the paper: all seven projections,
    rank 64, alpha 16, dropout 0.1). No targets: no LoRA."""

    targets: list = dataclasses.field(default_factory=list)
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.1

    @property
    def enabled(self) -> bool:
        return bool(self.targets)


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
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
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
    if p.topk == 1 and (p.routing != "softmax_topk" or p.renormalize):
        # a softmax over the one chosen logit, or one renormalised weight, is always 1: the
        # router would get no gradient (megatron-core refuses it too)
        bad("topk", "needs routing=softmax_topk and renormalize=false (a single expert's "
            "weight would otherwise always be 1)")
    if p.adapter_activation not in ACTIVATIONS:
        bad("adapter_activation", f"must be one of {', '.join(ACTIVATIONS)}")
    if p.dispatcher not in DISPATCHERS:
        bad("dispatcher", f"must be one of {', '.join(DISPATCHERS)}")
    if p.aux_loss_coeff < 0 or p.z_loss_coeff < 0:
        bad("aux_loss_coeff" if p.aux_loss_coeff < 0 else "z_loss_coeff", "must be >= 0")
    if p.capacity_factor is not None and p.capacity_factor <= 0:
        bad("capacity_factor", "must be > 0 (or null for dropless)")


def lora_shapes(m: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each LoRA target projection."""
    q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    h, f = m.hidden_size, m.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}


def validate_lora(lora: LoRAConfig, m: Optional[ModelConfig] = None) -> None:
    """Checks the LoRA settings; with the model, also that the rank fits every target."""
    if not isinstance(lora.targets, list) or not all(isinstance(t, str) for t in lora.targets):
        raise ConfigError(f"lora.targets={lora.targets!r}: expected a list of projection names "
                          f"({', '.join(LORA_TARGETS)})")
    for t in lora.targets:
        if t not in LORA_TARGETS:
            raise ConfigError(f"lora.targets: {t!r} matches no module (the projections are "
                              f"{', '.join(LORA_TARGETS)})")
    if len(set(lora.targets)) != len(lora.targets):
        raise ConfigError(f"lora.targets={lora.targets!r}: a projection is listed twice")
    if lora.rank <= 0:
        raise ConfigError(f"lora.rank={lora.rank}: must be >= 1")
    for t in lora.targets if m is not None else ():
        fan_in, fan_out = lora_shapes(m)[t]
        if lora.rank > min(fan_in, fan_out):
            raise ConfigError(f"lora.rank={lora.rank}: larger than {t} ({fan_in} inputs, "
                              f"{fan_out} outputs); use at most {min(fan_in, fan_out)}")
    if lora.alpha <= 0:
        raise ConfigError(f"lora.alpha={lora.alpha}: must be > 0")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout={lora.dropout}: must be in [0, 1)")


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


# --------------------------------------------------------------------------------------------
# Training jobs (`pesc train CONFIG.yaml key=value ...`): YAML sections, validated as a whole.
# --------------------------------------------------------------------------------------------
SCHEDULES = ("constant_with_warmup", "cosine", "linear")
RECOMPUTE = ("none", "selective", "full")
ATTENTIONS = ("auto", "sdpa", "local", "te")  # model/attention.py
EXPERT_IMPLS = ("grouped", "sequential")  # model/pesc_layer.py
# PESC settings a training run may change; the rest are fixed by the checkpoint's weights.
TRAIN_TIME_PESC = ("adapter_dropout", "aux_loss_coeff", "z_loss_coeff", "capacity_factor",
                   "dispatcher")


@dataclass
class TrainModelConfig:
    checkpoint: str = ""  # a PESC checkpoint from `pesc convert hf-to-pesc` (the frozen base)
    dtype: str = "fp32"  # fp32, or bf16 (GPU); the frozen base and activations
    recompute: str = "none"  # none | selective (core attention) | full (every layer)
    # core attention: auto (te with Transformer Engine on a GPU, else sdpa) | sdpa (torch's
    # fused kernels) | local (megatron-core's unfused reference) | te (model/attention.py)
    attention: str = "auto"
    # adapter experts: grouped (two grouped GEMMs, torch._grouped_mm; megatron-core's loop
    # where that kernel cannot run) | sequential (megatron-core's SequentialMLP loop)
    experts: str = "grouped"


@dataclass
class DataConfig:
    train: list = dataclasses.field(default_factory=list)  # paths or {path, weight}
    valid: list = dataclasses.field(default_factory=list)  # paths; evaluated every eval_interval
    seq_length: int = 512
    packing: bool = True  # several samples per sequence, no attention across them
    on_error: str = "raise"  # raise | skip (bad records are counted and reported)
    overlong: str = "truncate"  # truncate | drop
    tokenizer: Optional[str] = None  # None: the checkpoint's tokenizer/ folder
    cache_dir: Optional[str] = None  # None: {train.out_dir}/token_cache


@dataclass
class OptimConfig:
    lr: float = 2e-4
    min_lr: float = 0.0  # end of cosine/linear decay
    schedule: str = "constant_with_warmup"
    warmup_steps: int = 200
    clip_grad: float = 0.3  # 0: off
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    distributed: bool = False  # megatron-core's distributed optimizer (state sharded over DP)


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 256
    iters: Optional[int] = None  # None: one epoch of data.train
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 0  # 0: only at the end (when data.valid is set)
    save_interval: int = 0  # 0: only at the end
    keep_last: int = 2  # training checkpoints kept (older ones are deleted)
    out_dir: str = "runs/pesc"
    dist_timeout_minutes: int = 60  # collectives' timeout; rank 0 tokenises while others wait
    profile_step: int = 0  # >0: this step runs under torch.profiler (train/profile.py)


FROZEN_WEIGHTS = ("fp32", "bf16", "fp8")
FP8_MATMULS = ("auto", "dequantize", "scaled_mm")
TE_FP8_RECIPES = ("delayed", "tensorwise", "blockwise")  # megatron-core's fp8_recipe names


@dataclass
class PrecisionConfig:
    """Storage and arithmetic of the frozen base. Routers, adapters, LoRA and norms keep the
    model dtype (and routers fp32) whatever is chosen here."""

    frozen_weights: Optional[str] = None  # None: model.dtype; fp8: torchao e4m3 (model/fp8.py)
    fp8_matmul: str = "auto"  # frozen_weights=fp8: auto | dequantize | scaled_mm
    fp8_output_layer: bool = True  # frozen_weights=fp8: the logits' weights (output layer, a
    # tied embedding) too, with `fp8_output_outliers` of their hidden columns in high precision
    fp8_output_outliers: int = 32
    fp8: Optional[str] = None  # Transformer Engine FP8 recipe (GPU with TE only)
    fp8_margin: int = 0  # TE: scale = max representable / (amax * 2^margin)
    fp8_amax_history_len: int = 1  # TE delayed scaling: amaxes kept per tensor


def validate_precision(p: PrecisionConfig, dtype: str) -> None:
    """Checks the settings alone (`check_fp8_machine` checks this machine for them)."""
    def bad(key, msg):
        raise ConfigError(f"precision.{key}={getattr(p, key)!r}: {msg}")

    if p.frozen_weights is not None and p.frozen_weights not in FROZEN_WEIGHTS:
        bad("frozen_weights", f"must be one of {', '.join(FROZEN_WEIGHTS)} (or null: the "
            "model dtype)")
    if p.frozen_weights in ("fp32", "bf16") and p.frozen_weights != dtype:
        bad("frozen_weights", f"the base computes in the model dtype {dtype}; use {dtype} or "
            "fp8")
    if p.fp8_matmul not in FP8_MATMULS:
        bad("fp8_matmul", f"must be one of {', '.join(FP8_MATMULS)}")
    if p.fp8 is not None and p.fp8 not in TE_FP8_RECIPES:
        bad("fp8", f"must be one of {', '.join(TE_FP8_RECIPES)} (or null: no Transformer "
            "Engine FP8)")
    if p.fp8 is not None and p.frozen_weights == "fp8":
        bad("fp8", "Transformer Engine FP8 and precision.frozen_weights=fp8 exclude each "
            "other; choose one")
    if p.fp8_output_outliers < 0:
        bad("fp8_output_outliers", "must be >= 0 (0: the whole output layer in FP8)")
    if p.fp8_margin < 0:
        bad("fp8_margin", "must be >= 0")
    if p.fp8_amax_history_len < 1:
        bad("fp8_amax_history_len", "must be >= 1")


def check_fp8_machine(p: PrecisionConfig) -> None:
    """FP8 arithmetic needs a GPU that has it (compute capability 8.9+: Ada, Hopper, later);
    Transformer Engine's FP8 (`precision.fp8`) also needs TE and CUDA. torchao's FP8 storage
    (`frozen_weights: fp8`) works anywhere; its `scaled_mm` products also run on CPUs."""
    import torch

    def no_fp8_gpu(where: str, instead: str) -> None:
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            raise ConfigError(f"{where}: {torch.cuda.get_device_name()} (compute capability "
                              f"{major}.{minor}) has no FP8 arithmetic (needs 8.9+); {instead}")

    if p.frozen_weights == "fp8" and p.fp8_matmul == "scaled_mm" and torch.cuda.is_available():
        no_fp8_gpu("precision.fp8_matmul=scaled_mm", "use precision.fp8_matmul=dequantize")
    if p.fp8 is None:
        return
    where = f"precision.fp8={p.fp8}"
    instead = "use precision.frozen_weights=fp8 (torchao, no Transformer Engine) instead"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # not installed, or built for another torch/CUDA
        raise ConfigError(f"{where}: Transformer Engine does not import ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); {instead}") from None
    if not torch.cuda.is_available():
        raise ConfigError(f"{where}: Transformer Engine's FP8 needs a CUDA GPU; {instead}")
    no_fp8_gpu(where, instead)


@dataclass
class JobConfig:
    model: TrainModelConfig = dataclasses.field(default_factory=TrainModelConfig)
    pesc: dict = dataclasses.field(default_factory=dict)  # overrides of TRAIN_TIME_PESC keys
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """`a.b=value` sets tree[a][b]; the value is parsed as YAML (5, 1e-4, true, [x, y])."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-4)")
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = _parse_value(text)
    return tree


def job_from_dict(tree: dict, where: str = "") -> JobConfig:
    sections = {f.name: f for f in dataclasses.fields(JobConfig)}
    unknown = sorted(set(tree) - set(sections))
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}: unknown section (known: "
                          f"{', '.join(sections)})")
    values = {}
    for name, value in tree.items():
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{name}: expected a mapping, got {value!r}")
        if name == "pesc":
            bad = sorted(set(value) - set(TRAIN_TIME_PESC))
            if bad:
                raise ConfigError(f"{where}pesc.{bad[0]}: not a training-time option (the "
                                  f"checkpoint fixes it; allowed: {', '.join(TRAIN_TIME_PESC)})")
            from_dict(PESCConfig, value, f"{where}pesc.")  # type check
            values[name] = dict(value)
        else:
            values[name] = from_dict(type(getattr(JobConfig(), name)), value, f"{where}{name}.")
    job = JobConfig(**values)
    try:
        validate_job(job)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    return job


def load_job(path: str, overrides: list[str] = ()) -> JobConfig:
    """Reads a YAML job file, applies `key=value` overrides, validates every section."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return job_from_dict(apply_overrides(tree, list(overrides)), f"{path}: ")


def validate_job(job: JobConfig) -> None:
    def bad(key, msg):
        section, name = key.split(".")
        raise ConfigError(f"{key}={getattr(getattr(job, section), name)!r}: {msg}")

    if not job.model.checkpoint:
        raise ConfigError("model.checkpoint: required (a folder from `pesc convert hf-to-pesc`)")
    if job.model.dtype not in ("fp32", "bf16"):
        bad("model.dtype", "must be fp32 or bf16")
    if job.model.recompute not in RECOMPUTE:
        bad("model.recompute", f"must be one of {', '.join(RECOMPUTE)}")
    if job.model.attention not in ATTENTIONS:
        bad("model.attention", f"must be one of {', '.join(ATTENTIONS)}")
    if job.model.experts not in EXPERT_IMPLS:
        bad("model.experts", f"must be one of {', '.join(EXPERT_IMPLS)}")
    if not job.data.train:
        raise ConfigError("data.train: required (a list of JSONL/JSON files)")
    for key in ("train", "valid"):
        for i, entry in enumerate(getattr(job.data, key)):
            ok = isinstance(entry, str) or (
                isinstance(entry, dict) and set(entry) <= {"path", "weight"} and "path" in entry
                and isinstance(entry.get("weight", 1), (int, float)))
            if not ok or (key == "valid" and not isinstance(entry, str)):
                raise ConfigError(f"data.{key}[{i}]={entry!r}: expected a path"
                                  + (" or {path, weight}" if key == "train" else ""))
    validate_lora(job.lora)
    validate_precision(job.precision, job.model.dtype)
    if job.precision.fp8 is not None and job.lora.enabled:
        raise ConfigError(f"precision.fp8={job.precision.fp8} with lora.targets: LoRA on "
                          "Transformer Engine's linears is not implemented; use "
                          "precision.frozen_weights=fp8")
    if job.data.seq_length < 2:
        bad("data.seq_length", "must be >= 2")
    if job.parallel.sequence_parallel and job.data.seq_length % job.parallel.tp:
        bad("data.seq_length", f"is not divisible by parallel.tp={job.parallel.tp} (sequence "
            "parallelism splits every sequence over the TP ranks)")
    if job.data.on_error not in ("raise", "skip"):
        bad("data.on_error", "must be raise or skip")
    if job.data.overlong not in ("truncate", "drop"):
        bad("data.overlong", "must be truncate or drop")
    if job.optim.schedule not in SCHEDULES:
        bad("optim.schedule", f"must be one of {', '.join(SCHEDULES)}")
    for key in ("lr", "min_lr", "clip_grad", "weight_decay", "adam_eps"):
        if getattr(job.optim, key) < 0:
            bad(f"optim.{key}", "must be >= 0")
    if job.optim.warmup_steps < 0:
        bad("optim.warmup_steps", "must be >= 0")
    t = job.train
    for key in ("micro_batch_size", "global_batch_size", "log_interval", "keep_last",
                "dist_timeout_minutes"):
        if getattr(t, key) < 1:
            bad(f"train.{key}", "must be >= 1")
    for key in ("eval_interval", "save_interval"):
        if getattr(t, key) < 0:
            bad(f"train.{key}", "must be >= 0 (0: only at the end)")
    if t.profile_step < 0:
        bad("train.profile_step", "must be >= 0 (0: no profiling)")
    if t.iters is not None and t.iters < 1:
        bad("train.iters", "must be >= 1 (or null for one epoch)")
    if t.global_batch_size % t.micro_batch_size:
        bad("train.global_batch_size", f"is not divisible by train.micro_batch_size="
            f"{t.micro_batch_size}")


def check_batch_layout(job: JobConfig, world_size: int) -> int:
    """Checks that the global batch splits into whole micro-batches per data-parallel rank of
    this world; returns the number of micro-batches per rank and step."""
    par = job.parallel
    dp = world_size // (par.tp * par.pp)
    per_step = job.train.micro_batch_size * dp
    if job.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={job.train.global_batch_size} is not divisible by "
            f"train.micro_batch_size*data-parallel size={job.train.micro_batch_size}*{dp}")
    return job.train.global_batch_size // per_step
