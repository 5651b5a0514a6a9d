"""PESC megatron-core checkpoint -> Hugging Face folder in the released Camelidae layout
(or, for a model whose adapters are all zero, the plain dense architecture)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from pesc_megatron.checkpoint import base as checkpoint
from pesc_megatron.checkpoint.atomic import staged
from pesc_megatron.checkpoint.format import TOKENIZER, CheckpointInfo, check_out, read_info
from pesc_megatron.interop.mapping import expand, lora_pairs, rules_for
from pesc_megatron.interop.reshape import to_hf
from pesc_megatron.model.builder import DTYPES
from pesc_megatron.parallel.config import ParallelConfig
from pesc_megatron.parallel.distributed import initialize
from pesc_megatron.schema import ConfigError

MODELING_DIR = Path(__file__).parent / "hf_modeling"
MODELING_FILES = ("configuration_camelidae.py", "modeling_camelidae.py")


def _hf_dtype(dtype: str) -> str:
    """"bf16" -> "bfloat16", as config.json spells torch dtypes."""
    return str(DTYPES[dtype]).removeprefix("torch.")


def camelidae_config(info: CheckpointInfo) -> dict:
    """The source model's config.json turned into the Camelidae one."""
    cfg = {k: v for k, v in info.hf_config.items() if k not in ("auto_map", "architectures")}
    p = info.pesc
    cfg.update(
        architectures=["CamelidaeForCausalLM"], model_type="camelidae",
        # AutoModel too: vLLM's Transformers backend builds the base model through it
        auto_map={"AutoConfig": "configuration_camelidae.CamelidaeConfig",
                  "AutoModel": "modeling_camelidae.CamelidaeModel",
                  "AutoModelForCausalLM": "modeling_camelidae.CamelidaeForCausalLM"},
        num_experts=p.num_experts, topk=p.topk, adapter_dim=p.adapter_dim,
        moe_scaling=p.adapter_scaling, moe_dtype=_hf_dtype(info.dtype),
        routing=p.routing, renormalize=p.renormalize, adapter_act=p.adapter_activation,
        adapter_dropout=p.adapter_dropout, qkv_bias=info.model.attention_bias,
        attention_bias=False, dtype=_hf_dtype(info.dtype))
    return cfg


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


LORA_DIR = "lora"  # --no-merge-lora: the PEFT adapter, loadable with PeftModel.from_pretrained


def peft_adapter(state: dict, info: CheckpointInfo) -> tuple[dict, dict]:
    """(tensors, adapter_config.json) of the LoRA weights in PEFT's saved layout."""
    lora = info.lora
    tensors = {}
    for module, a, b in lora_pairs(state, lora.targets, info.model.num_hidden_layers):
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path="..",
                  r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                  target_modules=sorted(lora.targets), bias="none", fan_in_fan_out=False,
                  inference_mode=True)
    return tensors, config


def merge_lora(tensors: dict, state: dict, info: CheckpointInfo) -> None:
    """W += (alpha / r) * B A for every LoRA pair, computed in float64."""
    scale = info.lora.alpha / info.lora.rank
    for module, a, b in lora_pairs(state, info.lora.targets, info.model.num_hidden_layers):
        w = tensors[module + ".weight"]
        tensors[module + ".weight"] = (w.double() + scale * (b.double() @ a.double())).to(w.dtype)


def export(ckpt: str | Path, out: str | Path, fmt: str = "camelidae", force: bool = False,
           max_shard_gb: float = 5.0, merge: bool = True, base: str | Path | None = None
           ) -> Path:
    """Writes `out` atomically (a `.partial` folder renamed at the end). Single process.
    LoRA, if the checkpoint has it, is merged into the base weights, or with `merge=False`
    written beside them as a PEFT adapter in `out/lora/`. `base`: where a training
    checkpoint's base is, if it moved."""
    ckpt, out = Path(ckpt), Path(out)
    if fmt not in ("camelidae", "dense"):
        raise ConfigError(f"--format {fmt!r}: use camelidae or dense")
    check_out(out, force, source=ckpt)
    info = read_info(ckpt, base)
    if fmt == "dense" and not info.hf_config.get("architectures"):
        raise ConfigError(f"{ckpt}: the source architecture is unknown; use --format camelidae")
    initialize(ParallelConfig())
    model, info = checkpoint.load(ckpt, ParallelConfig(), initialize=False, base=base)
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    dense = fmt == "dense"
    if dense:
        live = [n for n, t in state.items() if ".linear_fc2." in n and ".experts." in n
                and torch.count_nonzero(t)]
        if live:
            raise ConfigError(f"{ckpt}: adapters are not zero (e.g. {live[0]}); the dense "
                              "format would drop them, use --format camelidae")
    arch = "CamelidaeForCausalLM" if not dense else info.hf_config["architectures"][0]
    tensors = {}
    for mname, hf_names, kind in expand(rules_for(arch, info.model, with_pesc=not dense),
                                        info.model.num_hidden_layers, info.pesc.num_experts):
        for name, t in zip(hf_names, to_hf(kind, state[mname], info.model)):
            tensors[name] = t.contiguous()

    adapter = None
    if info.lora.enabled:
        if merge:
            merge_lora(tensors, state, info)
        else:
            adapter = peft_adapter(state, info)

    config = dict(info.hf_config) if dense else camelidae_config(info)
    config.pop("torch_dtype", None)  # transformers 5 reads `dtype`
    config["dtype"] = _hf_dtype(info.dtype)
    with staged(out) as partial:
        _write_shards(tensors, partial, int(max_shard_gb * 2**30))
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not dense:
            for f in MODELING_FILES:
                shutil.copy2(MODELING_DIR / f, partial / f)
        if adapter is not None:
            from safetensors.torch import save_file

            (partial / LORA_DIR).mkdir()
            save_file(adapter[0], str(partial / LORA_DIR / "adapter_model.safetensors"),
                      metadata={"format": "pt"})
            (partial / LORA_DIR / "adapter_config.json").write_text(
                json.dumps(adapter[1], indent=2) + "\n")
        tokenizer = info.base / TOKENIZER
        if tokenizer.is_dir():
            for f in tokenizer.iterdir():
                shutil.copy2(f, partial / f.name)
    return out
