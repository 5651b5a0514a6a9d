"""`pesc bench compare`: one model and batch trained six ways, side by side.

    dense_full     dense fine-tuning: every weight trains
    dense_frozen   the dense model frozen, backward to the input only (the floor)
    pesc           PESC: frozen base, routers + adapter experts train
    pesc_lora      PESC plus LoRA on q/k/v/o/gate/up/down
    upcycle        full sparse upcycling: megatron-core's MoE layer with E full SwiGLU experts
                   (weights from `upcycling_utils`), top-k, everything trains
    reference      the original release's design: a Hugging Face Llama whose MLP output feeds
                   adapter experts run one at a time over boolean-mask-selected tokens
    train          `pesc train` itself (torchrun, 1 rank) on --base and --data: megatron-core's
                   DDP, optimizer, schedule and clipping, packed real records, the data path
                   and the metrics; its step times are the ones metrics.jsonl reports

The PESC variants (pesc, pesc_lora, train) run once per `--attentions` entry (model.attention:
sdpa, torch's fused kernels; local, megatron-core's unfused attention); the dense and
upcycled baselines use the first entry.

Each variant runs in a child process of this command (one process tree, one invocation), one
after the other, so that each one's peak resident memory is its own: warmup steps, then timed
steps of forward + backward + AdamW step (torch's fused AdamW for all, fp32). Reported per
variant: median step time, tokens/s, trainable parameters, bytes of parameters + gradients +
optimizer state (summed over the real tensors), peak resident memory (VmHWM) and the bytes a
training checkpoint holds (trainable weights + Adam state). `--scaling` adds pesc and upcycle
at 4, 8, 16 and 32 experts and at growing tokens per step, with PNG plots. JSON and a Markdown
table go to --out; the last stdout line is the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pesc_megatron.checkpoint.atomic import atomic_path
from pesc_megatron.checkpoint.format import read_info
from pesc_megatron.cli.args import add_pesc_args
from pesc_megatron.model.attention import resolve_attention
from pesc_megatron.model.builder import build_model, transformer_config
from pesc_megatron.model.config import LORA_TARGETS, LoRAConfig, PESCConfig
from pesc_megatron.model.norm import SequenceParallelTorchNorm
from pesc_megatron.model.size import PRESETS, count_parameters
from pesc_megatron.model.spec import core_attention
from pesc_megatron.parallel import distributed
from pesc_megatron.parallel.config import ParallelConfig
from pesc_megatron.schema import ConfigError

VARIANTS = ("dense_full", "dense_frozen", "pesc", "pesc_lora", "upcycle", "reference", "train")
WITH_ATTENTION = ("pesc", "pesc_lora", "train")


def _parse(argv):
    p = argparse.ArgumentParser(prog="pesc bench compare",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a `pesc info` preset")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the preset")
    add_pesc_args(p, ("num_experts", "topk"), dict(num_experts=PESCConfig.num_experts,
                                                   topk=PESCConfig.topk))
    p.add_argument("--adapter-dims", default="64,256", help="PESC/reference variants per dim")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-length", "--seq", dest="seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "train"))
    p.add_argument("--attentions", default="sdpa", help="model.attention values for the PESC "
                   "variants, e.g. sdpa,local")
    p.add_argument("--base", help="train: a PESC checkpoint (`pesc convert hf-to-pesc`)")
    p.add_argument("--data", help="train: instruction records (JSON/JSONL), packed")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list this many times (A B C A B C ...); a variant's "
                   "step time is the median over all its timed steps")
    p.add_argument("--scaling", action="store_true",
                   help="also pesc vs upcycle over experts and tokens (at --scaling-layers)")
    p.add_argument("--scaling-layers", type=int, default=4)
    p.add_argument("--out", default="runs/bench/compare")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--child", help=argparse.SUPPRESS)  # JSON spec of one measurement
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# One measurement (in a child process)
# ------------------------------------------------------------------------------------------
def _vm_hwm() -> int:
    """Peak resident memory of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _moe_config(model, experts: int, topk: int):
    """The PESC model's TransformerConfig turned into full sparse upcycling's (E full SwiGLU
    experts, no shared FFN) or, with experts=0, the dense model's."""
    import dataclasses


    cfg = transformer_config(model, PESCConfig(num_experts=max(experts, 2), topk=topk),
                             ParallelConfig())
    return dataclasses.replace(cfg, moe_shared_expert_intermediate_size=None,
                               moe_ffn_hidden_size=model.intermediate_size if experts else None,
                               num_moe_experts=experts or None)


def _gpt(model, config, spec):
    """A GPTModel of `spec` layers and, as PESC's, our RMSNorm as the final norm."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    block = TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config),
                                       layer_norm=SequenceParallelTorchNorm)
    return GPTModel(config=config, transformer_layer_spec=block, vocab_size=model.vocab_size,
                    max_sequence_length=model.max_position_embeddings,
                    share_embeddings_and_output_weights=model.tie_word_embeddings,
                    position_embedding_type="rope", rotary_base=model.rope_theta)


def _local_spec(attention: str, **kwargs):
    """megatron-core's local layer spec with the PESC variants' core attention and norms (the
    baselines use the same attention and RMSNorm as PESC, so that the rows differ in the MLP
    only)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm", **kwargs)
    spec.submodules.self_attention.submodules.core_attention = core_attention(
        resolve_attention(attention))
    spec.submodules.input_layernorm = SequenceParallelTorchNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    return spec


def _dense_gpt(model, attention: str = "auto"):
    return _gpt(model, _moe_config(model, 0, 2), _local_spec(attention))


def _build(spec: dict):
    """(model, forward(tokens, labels) -> loss) for one variant."""
    model_cfg = spec["model_cfg"]
    kind, e, k, r = spec["variant"], spec["experts"], spec["topk"], spec["adapter_dim"]
    attention = spec.get("attention") or "auto"
    if kind in ("pesc", "pesc_lora"):
        lora = LoRAConfig(targets=list(LORA_TARGETS), rank=spec["lora_rank"]) if kind == "pesc_lora" \
            else None
        model = build_model(model_cfg, PESCConfig(num_experts=e, topk=k, adapter_dim=r),
                            ParallelConfig(), lora=lora, attention=attention)
        with torch.no_grad():  # trained adapters are not zero (same cost, honest routing)
            for name, p in model.named_parameters():
                if ".experts." in name and "linear_fc2" in name:
                    p.normal_(0, 0.02)
        return model, _megatron_forward(model)
    if kind in ("dense_full", "dense_frozen"):
        model = _dense_gpt(model_cfg, attention)
        trainable = kind == "dense_full"
        for p in model.parameters():
            p.requires_grad_(trainable)
        if not trainable:  # backward through every layer, to the input only
            model.embedding.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        return model, _megatron_forward(model)
    if kind == "upcycle":
        from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

        dense = _dense_gpt(model_cfg, attention)
        model = _gpt(model_cfg, _moe_config(model_cfg, e, k),
                     _local_spec(attention, num_experts=e, moe_grouped_gemm=False))
        model.load_state_dict(upcycle_state_dict([model], [dense])["model"], strict=False)
        del dense
        return model, _megatron_forward(model)
    if kind == "reference":
        return _reference_model(model_cfg, e, k, r)
    raise ValueError(kind)


def _megatron_forward(model):
    def forward(tokens, labels):
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        return model(tokens, pos, None, labels=labels).float().mean()

    return forward


def _reference_model(model_cfg, experts, topk, adapter_dim):
    """A transformers LlamaForCausalLM whose every MLP becomes ReferencePESC (frozen base)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = model_cfg
    hf = LlamaForCausalLM(LlamaConfig(
        hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, vocab_size=m.vocab_size,
        max_position_embeddings=m.max_position_embeddings, rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_word_embeddings))
    hf.requires_grad_(False)
    for layer in hf.model.layers:
        layer.mlp = ReferencePESC(layer.mlp, m.hidden_size, experts, topk, adapter_dim)
    hf.enable_input_require_grads()  # as PEFT does over a frozen base

    def forward(tokens, labels):
        logits = hf(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                 labels.flatten())
        return loss + sum(layer.mlp.aux_loss for layer in hf.model.layers)

    return hf, forward


class ReferencePESC(torch.nn.Module):
    """GUIDE's formula as the original release computes it: the frozen MLP once, then a Python
    loop over the experts, each taking the tokens a boolean mask selects
    (`torch.where(idx == j)`, a host sync on GPUs), with the Switch aux loss."""

    def __init__(self, mlp, hidden, experts, topk, adapter_dim, scaling=0.25, dropout=0.1,
                 aux_coeff=0.01):
        super().__init__()
        self.mlp, self.topk, self.scaling = mlp, topk, scaling
        self.dropout, self.aux_coeff = dropout, aux_coeff
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        self.down = torch.nn.ModuleList(torch.nn.Linear(hidden, adapter_dim, bias=False)
                                        for _ in range(experts))
        self.up = torch.nn.ModuleList(torch.nn.Linear(adapter_dim, hidden, bias=False)
                                      for _ in range(experts))
        with torch.no_grad():
            for up in self.up:
                up.weight.normal_(0, 0.02)
        self.aux_loss = 0.0

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        f = self.mlp(x)
        logits = self.router(x).float()
        top, idx = logits.topk(self.topk, dim=-1)
        weights = top.softmax(-1).to(f.dtype)
        out = torch.zeros_like(f)
        for j, (down, up) in enumerate(zip(self.down, self.up)):
            rows, slot = torch.where(idx == j)
            u = F.dropout(f[rows], self.dropout, self.training)
            out[rows] += weights[rows, slot, None] * up(F.gelu(down(u)))
        probs = logits.softmax(-1)
        load = F.one_hot(idx, probs.shape[-1]).sum((0, 1)).float() / idx.numel()
        self.aux_loss = self.aux_coeff * probs.shape[-1] * (load * probs.mean(0)).sum()
        return (f + self.scaling * out).reshape(shape)


def measure_train(spec: dict) -> dict:
    """Runs `pesc train` (torchrun, one rank) for warmup + steps steps of one packed sequence
    batch of `batch` x `seq` on spec["data"]; its row from metrics.jsonl. The peak resident
    memory is the largest of this process's descendants (torchrun's worker)."""
    import resource
    import tempfile

    import yaml


    steps = spec["warmup"] + spec["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        job = dict(
            model=dict(checkpoint=spec["base"], dtype="fp32", attention=spec["attention"]),
            data=dict(train=[spec["data"]], seq_length=spec["seq"], packing=True,
                      cache_dir=f"{tmp}/cache"),
            optim=dict(lr=1e-4, warmup_steps=0, clip_grad=0.3),
            train=dict(micro_batch_size=spec["batch"], global_batch_size=spec["batch"],
                       iters=steps, log_interval=1, seed=spec["seed"], out_dir=f"{tmp}/run",
                       save_interval=0))
        Path(tmp, "job.yaml").write_text(yaml.safe_dump(job))
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone",
               "--nproc-per-node", "1", "-m", "pesc_megatron.cli", "train", f"{tmp}/job.yaml",
               "train.keep_last=1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pesc train failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text()
                .splitlines() if "step_time_s" in line]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    timed = rows[spec["warmup"]:]
    times = [r["step_time_s"] for r in timed]
    step_s = statistics.median(times)
    info = read_info(spec["base"])
    counts = count_parameters(info.model, info.pesc, info.lora)
    return dict(variant="train", attention=spec["attention"], experts=info.pesc.num_experts,
                topk=info.pesc.topk, adapter_dim=info.pesc.adapter_dim, lora_rank=None,
                layers=info.model.num_hidden_layers, tokens_per_step=spec["batch"] * spec["seq"],
                step_s=step_s, step_times_s=times,
                # real (non-padding) tokens: what metrics.jsonl counts
                tokens_per_s=statistics.median(r["tokens_per_s"] for r in timed),
                total_params=counts["total"], trainable_params=counts["trainable"],
                # not measured in the child's own process: None, not a made-up 0; the
                # trainable state is fp32 weights + grads + two Adam moments (16 B a param)
                param_grad_optim_bytes=None, trainable_and_optim_bytes=16 * counts["trainable"],
                checkpoint_bytes=12 * counts["trainable"], peak_rss_bytes=peak,
                baseline_rss_bytes=None)


def measure(spec: dict) -> dict:
    """Builds, warms up and times one variant in this process; returns its row."""
    import dataclasses

    if spec["variant"] == "train":
        return measure_train(spec)


    distributed.initialize(ParallelConfig(), seed=spec["seed"])
    model_cfg = PRESETS[spec["model"]]
    if spec["layers"]:
        model_cfg = dataclasses.replace(model_cfg, num_hidden_layers=spec["layers"])
    spec = dict(spec, model_cfg=model_cfg)
    baseline = _vm_hwm()
    model, forward = _build(spec)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = None if spec["variant"] == "dense_frozen" else torch.optim.AdamW(
        trainable, lr=1e-5, fused=True)  # fused: as `pesc train` runs it (train/optim.py)
    gen = torch.Generator().manual_seed(spec["seed"])
    tokens = torch.randint(0, model_cfg.vocab_size, (spec["batch"], spec["seq"] + 1),
                           generator=gen)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step():
        loss = forward(inputs, labels)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # keep the grads: they are counted
        return loss.item()

    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    params = list(model.parameters())
    opt_state = [v for s in (optimizer.state.values() if optimizer else ()) for v in s.values()
                 if torch.is_tensor(v) and v.numel() > 1]
    grads = [p.grad for p in trainable if p.grad is not None]
    step_s = statistics.median(times)
    return dict(
        variant=spec["variant"], experts=spec["experts"], topk=spec["topk"],
        attention=spec.get("attention") if spec["variant"] != "reference" else "sdpa",
        adapter_dim=spec["adapter_dim"] if spec["variant"] in ("pesc", "pesc_lora",
                                                               "reference") else None,
        lora_rank=spec["lora_rank"] if spec["variant"] == "pesc_lora" else None,
        layers=model_cfg.num_hidden_layers, tokens_per_step=spec["batch"] * spec["seq"],
        step_s=step_s, step_times_s=times, tokens_per_s=spec["batch"] * spec["seq"] / step_s,
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in trainable),
        param_grad_optim_bytes=nbytes(params) + nbytes(grads) + nbytes(opt_state),
        trainable_and_optim_bytes=nbytes(trainable) + nbytes(grads) + nbytes(opt_state),
        checkpoint_bytes=nbytes(trainable) + nbytes(opt_state),
        peak_rss_bytes=_vm_hwm(), baseline_rss_bytes=baseline,
    )


# ------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------
def _run_child(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "pesc_megatron.bench.compare", "--child", json.dumps(spec)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['variant']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratios(rows: list[dict]) -> dict:
    """The headline comparisons: PESC (first adapter dim) against full sparse upcycling, and
    PESC against the reference design at each adapter dim."""
    def find(variant, dim=None):
        return next((r for r in rows if r["variant"] == variant
                     and (dim is None or r["adapter_dim"] == dim)), None)

    out = {}
    pesc, upcycle = find("pesc"), find("upcycle")
    if pesc and upcycle:
        out["pesc_over_upcycle_trainable_optim_bytes"] = (
            pesc["trainable_and_optim_bytes"] / upcycle["trainable_and_optim_bytes"])
        out["pesc_over_upcycle_step_time"] = pesc["step_s"] / upcycle["step_s"]
        out["pesc_over_upcycle_peak_rss"] = pesc["peak_rss_bytes"] / upcycle["peak_rss_bytes"]
    for ref in (r for r in rows if r["variant"] == "reference"):
        mine = find("pesc", ref["adapter_dim"])
        if mine:
            out[f"pesc_over_reference_tokens_per_s_r{ref['adapter_dim']}"] = (
                mine["tokens_per_s"] / ref["tokens_per_s"])
        for train in (r for r in rows if r["variant"] == "train"):
            out[f"train_{train['attention']}_over_reference_tokens_per_s"] = (
                train["tokens_per_s"] / ref["tokens_per_s"])
            out[f"train_{train['attention']}_over_reference_peak_rss"] = (
                train["peak_rss_bytes"] / ref["peak_rss_bytes"])
    for variant in WITH_ATTENTION:  # the fused attention against the local one
        fused, local = (next((r for r in rows if r["variant"] == variant
                              and r.get("attention") == att), None) for att in ("sdpa", "local"))
        if fused and local:
            out[f"{variant}_local_over_sdpa_step_time"] = local["step_s"] / fused["step_s"]
            out[f"{variant}_sdpa_over_local_peak_rss"] = (fused["peak_rss_bytes"]
                                                          / local["peak_rss_bytes"])
    return out


def _merge_rounds(rounds: list[dict]) -> dict:
    """One row from a variant's rounds: the median over all timed steps, the highest peak."""
    times = [t for r in rounds for t in r["step_times_s"]]
    step_s = statistics.median(times)
    return dict(rounds[0], step_s=step_s, step_times_s=times,
                tokens_per_s=rounds[0]["tokens_per_step"] / step_s,
                peak_rss_bytes=max(r["peak_rss_bytes"] for r in rounds))


def _gb(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def markdown(rows: list[dict], base: dict) -> str:
    head = ("| variant | attention | adapter | step s | tokens/s | trainable | "
            "params+grads+optim GB | trainable+grads+optim GB | peak RSS GB | checkpoint GB | "
            f"step / {base['variant']} | trainable+optim / {base['variant']} |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r.get('attention') or ''} | {r['adapter_dim'] or ''} | "
            f"{r['step_s']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['trainable_params']:,} | "
            f"{_gb(r['param_grad_optim_bytes'])} | {_gb(r['trainable_and_optim_bytes'])} | "
            f"{_gb(r['peak_rss_bytes'])} | {_gb(r['checkpoint_bytes'])} | "
            f"{r['step_s'] / base['step_s']:.2f} | "
            f"{r['trainable_and_optim_bytes'] / base['trainable_and_optim_bytes']:.2f} |")
    return head + "\n".join(lines) + "\n"


def _plot_scaling(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis, key, fname in (("experts", "experts", "scaling_experts.png"),
                             ("tokens per step", "tokens_per_step", "scaling_tokens.png")):
        series = [r for r in rows if r["sweep"] == key]
        if not series:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
        for variant, style in (("pesc", "o-"), ("upcycle", "s--")):
            pts = sorted((r[key], r) for r in series if r["variant"] == variant)
            xs = [x for x, _ in pts]
            ax_t.plot(xs, [r["step_s"] for _, r in pts], style, label=variant)
            ax_m.plot(xs, [r["peak_rss_bytes"] / 2**30 for _, r in pts], style,
                      label=f"{variant} peak RSS")
            ax_m.plot(xs, [r["trainable_and_optim_bytes"] / 2**30 for _, r in pts], style,
                      alpha=0.5, label=f"{variant} trainable+grads+Adam")
        for ax, label in ((ax_t, "step time (s)"), (ax_m, "GB")):
            ax.set_xlabel(axis)
            ax.set_ylabel(label)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"PESC vs full sparse upcycling: {series[0]['layers']} layers, "
                     + ("top-2, adapter 64" if key == "experts" else "8 experts, top-2"))
        fig.tight_layout()
        with atomic_path(out / fname) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        written.append(str(out / fname))
    return written


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    if a.child:
        print(json.dumps(measure(json.loads(a.child))), flush=True)
        return 0
    import megatron.core


    if a.model not in PRESETS:
        raise ConfigError(f"--model {a.model!r}: use one of {', '.join(PRESETS)}")
    variants = a.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ConfigError(f"--variants: {bad[0]!r} is not one of {', '.join(VARIANTS)}")
    dims = [int(d) for d in a.adapter_dims.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = dict(model=a.model, layers=a.layers, experts=a.num_experts, topk=a.topk,
                adapter_dim=dims[0], lora_rank=a.lora_rank, batch=a.batch, seq=a.seq,
                steps=a.steps, warmup=a.warmup, seed=a.seed)
    attentions = a.attentions.split(",")
    bad = [x for x in attentions if x not in ("sdpa", "local")]
    if bad:
        raise ConfigError(f"--attentions: {bad[0]!r} is not sdpa or local")
    if "train" in variants and not (a.base and a.data):
        raise ConfigError("--variants train: needs --base (a PESC checkpoint) and --data")
    base.update(base=a.base, data=a.data)
    specs = []
    for v in variants:
        for d in (dims if v in ("pesc", "reference") else dims[:1]):
            # The baselines run with the first attention (the reference: transformers' SDPA).
            for att in (attentions if v in WITH_ATTENTION else attentions[:1]):
                specs.append(dict(base, variant=v, adapter_dim=d, attention=att))
    runs = [[] for _ in specs]
    for _ in range(a.rounds):  # interleaved, so that a slow spell of the machine hits all
        for spec, done in zip(specs, runs):
            row = _run_child(spec)
            done.append(row)
            print(f"{row['variant']:<13}{row.get('attention') or '':<6}adapter "
                  f"{str(row['adapter_dim'] or '-'):>4}  "
                  f"{row['step_s']:7.2f} s/step  {row['tokens_per_s']:7.0f} tok/s  "
                  f"trainable {row['trainable_params']:>13,}  peak "
                  f"{_gb(row['peak_rss_bytes'])} GB", flush=True)
    rows = [_merge_rounds(done) for done in runs]
    ref = next((r for r in rows if r["variant"] in ("pesc", "train")), rows[0])
    table = markdown(rows, ref)

    scaling = []
    if a.scaling:
        small = dict(base, layers=a.scaling_layers, steps=max(3, a.steps - 2))
        for e in (4, 8, 16, 32):
            for v in ("pesc", "upcycle"):
                scaling.append(dict(_run_child(dict(small, variant=v, experts=e)),
                                    sweep="experts"))
        for batch in (1, 2, 4, 8):
            for v in ("pesc", "upcycle"):
                scaling.append(dict(_run_child(dict(small, variant=v, batch=batch)),
                                    sweep="tokens_per_step"))
        table += "\n" + markdown([dict(r, variant=f"{r['variant']} E={r['experts']} "
                                       f"T={r['tokens_per_step']}") for r in scaling], ref)
    plots = _plot_scaling(scaling, out) if scaling else []

    result = dict(bench="compare", config={k: v for k, v in vars(a).items() if k != "child"},
                  ratios=_ratios(rows), rows=rows, scaling=scaling, plots=plots,
                  cpu_count=os.cpu_count(), loadavg_1m=os.getloadavg()[0], torch=torch.__version__,
                  megatron_core=megatron.core.__version__)
    (out / "compare.md").write_text(table)
    (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table)
    for key, value in result["ratios"].items():
        print(f"{key}: {value:.3f}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
