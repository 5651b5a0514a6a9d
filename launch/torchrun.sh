#!/usr/bin/env bash
# Runs a `pesc` subcommand under torchrun, on one node or on each node of a multi-node job.
# See usage() below or `launch/torchrun.sh --help`; launch/README.md has examples.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/torchrun.sh SUBCOMMAND [ARGS...]
  Runs `pesc SUBCOMMAND ARGS...` (train, eval, demo, bench, ...) under torchrun on this node.
  Run it once per node; relative paths in ARGS are taken from the current directory.

  launch/torchrun.sh demo --ep 2                                  # one node
  launch/torchrun.sh train examples/configs/camelidae-8x7b.yaml train.out_dir=/shared/run1
  NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh train CONFIG.yaml   # on host0
  NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 launch/torchrun.sh train CONFIG.yaml   # on host1

environment:
  NNODES         number of nodes (default 1)
  NODE_RANK      this node's rank, 0..NNODES-1 (default 0)
  MASTER_ADDR    address of node 0, reachable from every node (default 127.0.0.1)
  MASTER_PORT    a free TCP port on node 0 (default 29500). With NNODES=1 and MASTER_PORT
                 unset, torchrun --standalone picks a free port instead.
  GPUS_PER_NODE  processes per node (default: the GPUs nvidia-smi lists, limited to
                 CUDA_VISIBLE_DEVICES when that is set; 2 CPU processes without GPUs)
  TORCHRUN       torchrun to use (default: .venv/bin/torchrun of this repo, else torchrun on PATH)
  TORCHRUN_ARGS  extra torchrun options, e.g. "--max-restarts 0 --log-dir logs --tee 3"
EOF
}

if [ $# -eq 0 ]; then usage >&2; exit 2; fi
case "$1" in -h | --help | help) usage; exit 0 ;; esac

die() { echo "launch/torchrun.sh: error: $*" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
for name in NNODES NODE_RANK; do
  [[ ${!name} =~ ^[0-9]+$ ]] || die "$name=${!name}: expected a non-negative integer"
done
[ "$NNODES" -ge 1 ] || die "NNODES=$NNODES: must be >= 1"
[ "$NODE_RANK" -lt "$NNODES" ] || die "NODE_RANK=$NODE_RANK: must be < NNODES=$NNODES"
if [ -n "${MASTER_PORT:-}" ]; then
  [[ $MASTER_PORT =~ ^[0-9]+$ ]] || die "MASTER_PORT=$MASTER_PORT: expected a port number"
fi

if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    if [ "$GPUS_PER_NODE" -gt 0 ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
      IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
      GPUS_PER_NODE=${#visible[@]}
    fi
  fi
  [ "$GPUS_PER_NODE" -gt 0 ] || GPUS_PER_NODE=2  # no GPU: 2 CPU ranks (gloo)
fi
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE=$GPUS_PER_NODE: expected an integer >= 1"

if [ -z "${TORCHRUN:-}" ]; then
  if [ -x "$ROOT/.venv/bin/torchrun" ]; then
    TORCHRUN=$ROOT/.venv/bin/torchrun
  elif command -v torchrun >/dev/null 2>&1; then
    TORCHRUN=torchrun
  else
    die "no torchrun: neither $ROOT/.venv/bin/torchrun nor torchrun on PATH (set TORCHRUN)"
  fi
fi

if [ "$NNODES" -eq 1 ] && [ -z "${MASTER_PORT:-}" ]; then
  rendezvous=(--standalone)
  where="standalone (free port)"
else
  # Static rendezvous: node 0's torchrun hosts the TCP store at MASTER_ADDR:MASTER_PORT, every
  # node passes its fixed NODE_RANK, and the job starts once all NNODES have joined.
  MASTER_PORT=${MASTER_PORT:-29500}
  rendezvous=(--rdzv-backend static --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
  where="static at $MASTER_ADDR:$MASTER_PORT"
fi
read -r -a extra <<<"${TORCHRUN_ARGS:-}"

# The package imports from the repo without installation, from any working directory.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
echo "launch/torchrun.sh: node $NODE_RANK of $NNODES, $GPUS_PER_NODE processes per node," \
  "world $((NNODES * GPUS_PER_NODE)), rendezvous $where: pesc $*" >&2
exec "$TORCHRUN" --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  "${rendezvous[@]}" ${extra[@]+"${extra[@]}"} -m pesc_megatron.cli "$@"
