#!/usr/bin/env bash
# One command on one H200 (Python 3.12 with torch preinstalled, no network), about 5-8 minutes:
#   tests/gpu/run_h200.sh [WHEEL_DIR]        (default: tests/gpu/wheels)
# 1. PESC forward/backward parity CUDA vs CPU on a tiny model (fp32, TF32 off; packed
#    sequences, GQA, the fused attention, the grouped experts, model/norm.py's RMSNorm and
#    model/rope.py's RoPE);
# 2. the fused attention's varlen kernel against its per-sample SDPA path (bf16, Yi-34B's
#    heads, packed samples): errors and forward+backward time of each;
# 3. the grouped-GEMM experts against megatron-core's SequentialMLP loop (bf16, one
#    Yi-34B-shaped PESC layer): errors and time of each;
# 4. tokens/s and MFU of a Yi-34B-shaped PESC layer stack (hidden 7168, ffn 20480, 56/8 heads,
#    8 experts, top-2, adapter 512; as many layers as fit) in bf16, packed sequences,
# 5. the same with the FP8 frozen base (torchao e4m3, torch._scaled_mm products) and the NF4
#    frozen base (torchao NF4, dequantized to bf16 for each product).
# megatron-core and torchao (and numpy, if the image lacks it) come as wheels, fetched
# beforehand on a machine with network by tests/gpu/fetch_wheels.sh. Output: a Markdown table
# and a JSON line, also saved to $OUT (default /tmp/pesc_h200) for docs/.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=${1:-tests/gpu/wheels}
OUT=${OUT:-/tmp/pesc_h200}
mkdir -p "$OUT"
python3 -m venv --system-site-packages "$OUT/venv"      # keeps the preinstalled torch
PY=$OUT/venv/bin/python
python3 -c "import numpy" 2>/dev/null || "$PY" -m pip install -q --no-index \
  --find-links "$WHEELS" numpy
"$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" megatron-core torchao
"$PY" -c "import torch, megatron.core, torchao; print('torch', torch.__version__, 'cuda',
  torch.version.cuda, torch.cuda.get_device_name(), 'megatron-core', megatron.core.__version__,
  'torchao', torchao.__version__)"
PYTHONPATH=$PWD timeout 900 "$PY" tests/gpu/h200_check.py --workdir "$OUT" \
  | tee "$OUT/h200_check.txt"
