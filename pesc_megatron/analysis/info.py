"""`pesc info SOURCE`: the parameter counts of a PESC model (dense base, routers, adapters,
LoRA, trainable), computed from its settings without building it.

SOURCE is a preset (llama2-7b, llama2-13b, yi-34b, smollm2-135m), a Hugging Face folder or its
config.json, a PESC checkpoint or run folder, or a `pesc train` YAML job. Flags override the
PESC and LoRA settings; the last line is JSON."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from pesc_megatron.checkpoint.format import read_info
from pesc_megatron.interop.mapping import read_hf_config
from pesc_megatron.model.config import LORA_TARGETS, LoRAConfig, PESCConfig, validate_lora
from pesc_megatron.model.size import PRESETS, count_parameters
from pesc_megatron.schema import ConfigError
from pesc_megatron.train.config import load_job


def read_source(source: str):
    """(model, pesc, lora) of any SOURCE the command accepts."""
    if source in PRESETS:
        return PRESETS[source], PESCConfig(), LoRAConfig()
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{source}: neither a preset ({', '.join(PRESETS)}) nor a file or "
                          "folder")
    if path.suffix in (".yaml", ".yml"):
        job = load_job(source)
        info = read_info(job.model.checkpoint)
        return info.model, dataclasses.replace(info.pesc, **job.pesc), job.lora
    if path.is_dir() and not (path / "config.json").is_file():
        info = read_info(path)  # a PESC checkpoint or run folder
        return info.model, info.pesc, info.lora
    hf_config = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(hf_config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{hf_config}: not a readable Hugging Face config.json ({e})") from None
    _, model, pesc = read_hf_config(cfg, str(hf_config))
    return model, pesc or PESCConfig(), LoRAConfig()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pesc info", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="preset, Hugging Face folder/config.json, PESC checkpoint "
                    "or run folder, or a YAML job")
    ap.add_argument("--num-experts", type=int)
    ap.add_argument("--topk", type=int)
    ap.add_argument("--adapter-dim", type=int)
    ap.add_argument("--lora-rank", type=int, help="add (or resize) LoRA; 0 removes it")
    ap.add_argument("--lora-targets", help="comma-separated projections (default: all seven: "
                    f"{','.join(LORA_TARGETS)})")
    args = ap.parse_args(argv)

    model, pesc, lora = read_source(args.source)
    pesc = dataclasses.replace(pesc, **{k: getattr(args, k) for k in
                                        ("num_experts", "topk", "adapter_dim")
                                        if getattr(args, k) is not None})
    if args.lora_targets is not None:
        lora = dataclasses.replace(lora, targets=args.lora_targets.split(","))
    if args.lora_rank == 0:
        lora = LoRAConfig()
    elif args.lora_rank is not None:
        lora = dataclasses.replace(lora, rank=args.lora_rank,
                                   targets=lora.targets or list(LORA_TARGETS))
    validate_lora(lora, model)

    counts = count_parameters(model, pesc, lora)
    m = model
    print(f"model: {args.source} (hidden {m.hidden_size}, ffn {m.intermediate_size}, "
          f"{m.num_hidden_layers} layers, {m.num_attention_heads}/{m.num_key_value_heads} "
          f"heads, vocab {m.vocab_size})")
    lora_text = (f"LoRA r={lora.rank} on {', '.join(lora.targets)}" if lora.enabled
                 else "no LoRA")
    print(f"PESC: {pesc.num_experts} experts, top-{pesc.topk}, adapter {pesc.adapter_dim}; "
          f"{lora_text}")
    labels = {"dense": "dense base (frozen)", "routers": "routers", "adapters": "adapters",
              "lora": "LoRA", "trainable": "trainable", "total": "total"}
    for key, label in labels.items():
        share = (f"  ({100 * counts[key] / counts['dense']:.2f}% of the dense base)"
                 if key == "trainable" else "")
        print(f"{label:<20}{counts[key]:>16,}{share}")
    print(json.dumps(dict(counts, model=args.source, num_experts=pesc.num_experts,
                          topk=pesc.topk, adapter_dim=pesc.adapter_dim,
                          lora_rank=lora.rank if lora.enabled else 0,
                          lora_targets=lora.targets)))
    return 0
