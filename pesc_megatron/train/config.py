"""The training job (`pesc train CONFIG.yaml key=value ...`): its YAML sections as dataclasses,
`key=value` overrides, and the checks that need the whole job."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from pesc_megatron.model.config import LoRAConfig, PESCConfig
from pesc_megatron.model.precision import PrecisionConfig, validate_precision
from pesc_megatron.parallel.config import ParallelConfig, data_parallel_size, splits_over_tp
from pesc_megatron.schema import ConfigError, from_dict

SCHEDULES = ("constant_with_warmup", "cosine", "linear")
RECOMPUTE = ("none", "selective", "full")
ATTENTIONS = ("auto", "sdpa", "local", "te")  # model/attention.py
LOSS_ON = ("assistant", "last", "all")  # data/formats.py (which imports torch: not here)
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
    # paths or {path, weight, columns, split}: JSONL/JSON, Parquet, Arrow, datasets folders, or
    # `pesc preprocess` stores (data/sources.py)
    train: list = dataclasses.field(default_factory=list)
    valid: list = dataclasses.field(default_factory=list)  # as train, without weight
    seq_length: int = 512
    packing: bool = True  # several samples per sequence, no attention across them
    on_error: str = "raise"  # raise | skip (bad records are counted and reported)
    overlong: str = "truncate"  # truncate | drop
    tokenizer: Optional[str] = None  # None: the checkpoint's tokenizer/ folder
    cache_dir: Optional[str] = None  # None: {train.out_dir}/token_cache
    # the loss policy of turn formats: assistant (every assistant turn) | last (the last one
    # only) | all (every token, prompts too); a turn with "weight": 0 is never a target
    loss_on: str = "assistant"
    chat_template: Optional[str] = None  # a Jinja file replacing the HF tokenizer's template
    num_workers: int = 1  # tokenising processes (rank 0 only); 1: in the rank's own process


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
    dist_timeout_minutes: int = 60  # collectives' timeout (the wait for a data build has its own)
    profile_step: int = 0  # >0: this step runs under torch.profiler (train/profile.py)
    # true: the LM loss is every loss token's loss over the global batch's loss tokens, the
    # same objective at any micro-batch size and layout; false: megatron-core's default, the
    # mean of each micro-batch's token mean
    per_token_loss: bool = True
    # consecutive steps with a non-finite loss or gradient (each skipped: no update) before the
    # run stops
    max_skipped_steps: int = 5
    # checkpoints written by a background process (megatron-core's async dist_checkpointing)
    # while training goes on; `latest` moves only once a save is complete on every rank
    async_save: bool = False


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
        raise ConfigError("data.train: required (a list of data files)")
    for key in ("train", "valid"):
        keys = {"path", "columns", "split"} | ({"weight"} if key == "train" else set())
        for i, entry in enumerate(getattr(job.data, key)):
            ok = isinstance(entry, str) or (
                isinstance(entry, dict) and set(entry) <= keys and "path" in entry
                and isinstance(entry.get("weight", 1), (int, float))
                and isinstance(entry.get("columns", {}), dict)
                and isinstance(entry.get("split", ""), str))
            if not ok:
                raise ConfigError(f"data.{key}[{i}]={entry!r}: expected a path or "
                                  f"{{{', '.join(sorted(keys))}}}")
    validate_precision(job.precision, job.model.dtype)
    if job.precision.fp8 is not None and job.lora.enabled:
        raise ConfigError(f"precision.fp8={job.precision.fp8} with lora.targets: LoRA on "
                          "Transformer Engine's linears is not implemented; use "
                          "precision.frozen_weights=fp8")
    if job.data.seq_length < 2:
        bad("data.seq_length", "must be >= 2")
    if not splits_over_tp(job.parallel, job.data.seq_length):
        bad("data.seq_length", f"is not divisible by parallel.tp={job.parallel.tp} (sequence "
            "parallelism splits every sequence over the TP ranks)")
    if job.data.on_error not in ("raise", "skip"):
        bad("data.on_error", "must be raise or skip")
    if job.data.overlong not in ("truncate", "drop"):
        bad("data.overlong", "must be truncate or drop")
    if job.data.loss_on not in LOSS_ON:
        bad("data.loss_on", f"must be one of {', '.join(LOSS_ON)}")
    if job.data.num_workers < 1:
        bad("data.num_workers", "must be >= 1")
    if job.data.chat_template is not None and not Path(job.data.chat_template).is_file():
        bad("data.chat_template", "is not a file")
    if job.optim.schedule not in SCHEDULES:
        bad("optim.schedule", f"must be one of {', '.join(SCHEDULES)}")
    for key in ("lr", "min_lr", "clip_grad", "weight_decay", "adam_eps"):
        if getattr(job.optim, key) < 0:
            bad(f"optim.{key}", "must be >= 0")
    if job.optim.warmup_steps < 0:
        bad("optim.warmup_steps", "must be >= 0")
    t = job.train
    for key in ("micro_batch_size", "global_batch_size", "log_interval", "keep_last",
                "dist_timeout_minutes", "max_skipped_steps"):
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
    dp = data_parallel_size(par, world_size)
    per_step = job.train.micro_batch_size * dp
    if job.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={job.train.global_batch_size} is not divisible by "
            f"train.micro_batch_size*data-parallel size={job.train.micro_batch_size}*{dp}")
    return job.train.global_batch_size // per_step
