#!/usr/bin/env bash
# Runs a `pesc` subcommand under torchrun on one node or many.
#   launch/torchrun.sh demo --ep 2                      # one node, all its GPUs (or 2 CPU ranks)
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=host0 launch/torchrun.sh demo --tp 2 --ep 4
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
# GPUS_PER_NODE (the visible GPU count, else 2 CPU ranks), PYTHON (.venv/bin/python if present).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  -m pesc_megatron.cli "$@"
