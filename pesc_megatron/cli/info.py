"""`pesc info SOURCE`: the parameter counts of a PESC model (dense base, routers, adapters,
LoRA, trainable) and the bytes of its frozen base in `--dtype` or stored as
`--frozen-weights fp8|nf4`, computed from its settings without building it.

SOURCE is a preset (llama2-7b, llama2-13b, yi-34b, smollm2-135m), a Hugging Face folder or its
config.json, a PESC checkpoint or run folder, or a `pesc train` YAML job. Flags override the
PESC and LoRA settings; the last line is JSON."""
from __future__ import annotations

import argparse
import dataclasses
import json

from pesc_megatron.analysis.info import read_source
from pesc_megatron.analysis.plan import DTYPE_BYTES, Job, Layout, frozen_bytes
from pesc_megatron.cli.args import add_lora_args, add_pesc_args, lora_from_args, pesc_values
from pesc_megatron.model.config import validate_lora
from pesc_megatron.model.precision import LOW_PRECISION
from pesc_megatron.model.size import count_parameters


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pesc info", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="preset, Hugging Face folder/config.json, PESC checkpoint "
                    "or run folder, or a YAML job")
    add_pesc_args(ap)
    add_lora_args(ap)
    ap.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16",
                    help="model dtype (norms, high-precision columns; the base without "
                    "--frozen-weights)")
    ap.add_argument("--frozen-weights", choices=LOW_PRECISION,
                    help="the frozen base as precision.frozen_weights stores it by default")
    args = ap.parse_args(argv)

    model, pesc, lora = read_source(args.source)
    pesc = dataclasses.replace(pesc, **pesc_values(args))
    lora = lora_from_args(args, lora)
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
    # The whole model on one device: the planner's formula at TP = PP = 1.
    stored = frozen_bytes(Job(model, pesc, lora, dtype=args.dtype,
                              frozen_weights=args.frozen_weights), Layout(), 0)
    bf16 = frozen_bytes(Job(model, pesc, lora, dtype="bf16"), Layout(), 0)
    print(f"{'frozen base bytes':<20}{stored:>16,}  ({args.frozen_weights or args.dtype}; "
          f"{stored / bf16:.1%} of bf16)")
    print(json.dumps(dict(counts, frozen_bytes=stored, frozen_weights=args.frozen_weights,
                          dtype=args.dtype, model=args.source, num_experts=pesc.num_experts,
                          topk=pesc.topk, adapter_dim=pesc.adapter_dim,
                          lora_rank=lora.rank if lora.enabled else 0,
                          lora_targets=lora.targets)))
    return 0
