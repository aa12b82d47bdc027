#!/usr/bin/env bash
# Launch `python -m mmpretrain.train` with `accelerate launch` (config: launch/accelerate.yaml).
#   single node:  NPROC_PER_NODE=8 launch/accelerate.sh --config configs/base.yaml [key=value ...]
#                 (MASTER_PORT: the main process port; default: a free one)
#   multi-node:   on every node: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0> launch/accelerate.sh ...
#   on CPU:       NPROC_PER_NODE=2 (default: the number of GPUs, else 1)
set -euo pipefail
PYTHON=${PYTHON:-python}
# its environment's tools first (workers, and the ninja that JIT-builds DeepSpeed ops)
PATH="$(dirname "$(command -v "$PYTHON")"):$PATH"
export PATH
HERE=$(cd "$(dirname "$0")" && pwd)
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
NNODES=${NNODES:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$NNODES" = 1 ] && [ -z "${MASTER_PORT:-}" ]; then
    MASTER_PORT=$("$PYTHON" -m mmpretrain.preflight --free-port)  # one node: a free port, not 29500
fi
# on the main host, the launcher's own store binds the port: one line now if another job holds it
"$PYTHON" -m mmpretrain.preflight --check-port "${MASTER_ADDR:-127.0.0.1}" "${MASTER_PORT:-29500}" || exit 2
exec "$PYTHON" -m accelerate.commands.launch --config_file "${ACCELERATE_CONFIG:-$HERE/accelerate.yaml}" \
    --num_machines "$NNODES" --machine_rank "${NODE_RANK:-0}" \
    --num_processes $(( NNODES * NPROC_PER_NODE )) \
    --main_process_ip "${MASTER_ADDR:-127.0.0.1}" --main_process_port "${MASTER_PORT:-29500}" \
    -m mmpretrain.train "$@"
