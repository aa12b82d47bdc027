#!/usr/bin/env bash
# Launch `python -m mmpretrain.train` with torchrun. Arguments go to the trainer unchanged.
#   single node:  NPROC_PER_NODE=8 launch/torchrun.sh --config configs/base.yaml [key=value ...]
#   multi-node:   run the same line on every node, with
#                 NNODES=4 MASTER_ADDR=<host of any one node> [MASTER_PORT=29500] [RDZV_ID=myrun]
#                 (c10d rendezvous: ranks are assigned as nodes join; no NODE_RANK needed)
#   on CPU:       NPROC_PER_NODE=2 (processes per node; default: the number of GPUs, else 1)
set -euo pipefail
PYTHON=${PYTHON:-python}
# its environment's tools first (workers, and the ninja that JIT-builds DeepSpeed ops)
PATH="$(dirname "$(command -v "$PYTHON")"):$PATH"
export PATH
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
NNODES=${NNODES:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$NNODES" = 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    # one node: a private rendezvous on a free local port
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" \
        -m mmpretrain.train "$@"
fi
: "${MASTER_ADDR:?set MASTER_ADDR to the host name of one of the nodes}"
# on the rendezvous host, torchrun's own store binds the port: one line now if another job holds it
"$PYTHON" -m mmpretrain.preflight --check-port "$MASTER_ADDR" "${MASTER_PORT:-29500}" || exit 2
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" \
    --rdzv_id="${RDZV_ID:-mmpretrain}" --max_restarts=0 -m mmpretrain.train "$@"
