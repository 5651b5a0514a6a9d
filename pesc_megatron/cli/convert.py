"""`pesc convert hf-to-pesc | pesc-to-hf`."""
from __future__ import annotations

import argparse

from pesc_megatron.cli.args import add_pesc_args, pesc_values
from pesc_megatron.interop.hf_to_pesc import convert
from pesc_megatron.interop.pesc_to_hf import export

# The PESC settings conversion fixes (the rest are training-time settings).
CRAFT_SETTINGS = ("num_experts", "topk", "adapter_dim", "adapter_scaling", "adapter_dropout",
                  "routing", "renormalize")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pesc convert",
                                 description="Convert between Hugging Face and PESC checkpoints.")
    sub = ap.add_subparsers(dest="direction", required=True)

    a = sub.add_parser("hf-to-pesc", help="Hugging Face dense or Camelidae folder -> PESC "
                       "megatron-core checkpoint (loadable at any TP/PP/EP)")
    a.add_argument("--hf", required=True, help="Hugging Face model folder")
    a.add_argument("--out", required=True, help="checkpoint folder to create")
    add_pesc_args(a, CRAFT_SETTINGS, unset="a Camelidae source's")
    a.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    a.add_argument("--force", action="store_true", help="replace --out if it exists")

    b = sub.add_parser("pesc-to-hf", help="PESC checkpoint -> Hugging Face folder (Camelidae "
                       "layout, loadable with transformers)")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--format", choices=["camelidae", "dense"], default="camelidae",
                   help="dense: the source architecture without experts (adapters must be 0)")
    b.add_argument("--max-shard-gb", type=float, default=5.0)
    b.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=True,
                   help="merge trained LoRA into the base weights (default); --no-merge-lora "
                   "keeps the base unchanged and writes a PEFT adapter to OUT/lora/")
    b.add_argument("--base", help="where a training checkpoint's base checkpoint is, if it "
                   "moved (default: the path the run recorded)")
    b.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)

    if args.direction == "hf-to-pesc":
        out = convert(args.hf, args.out, pesc_values(args, CRAFT_SETTINGS), dtype=args.dtype,
                      force=args.force)
    else:
        out = export(args.ckpt, args.out, fmt=args.format, force=args.force,
                     max_shard_gb=args.max_shard_gb, merge=args.merge_lora, base=args.base)
    print(f"wrote {out}")
    return 0
