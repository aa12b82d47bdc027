#!/usr/bin/env bash
# Launch `python -m mmpretrain.train` with the deepspeed launcher. Arguments go to the trainer.
#   single node:  NUM_GPUS=8 launch/deepspeed.sh --config configs/base.yaml [key=value ...]
#                 (MASTER_PORT: the rendezvous port; default: a free one)
#   on CPU:       NUM_GPUS=2 (the number of processes; the flag is --num_gpus/--num_accelerators)
#   multi-node:   HOSTFILE=launch/hostfile launch/deepspeed.sh --config ...   (see hostfile.example)
#                 DS_LAUNCHER=pdsh (default: ssh to each host) | slurm (srun inside an allocation)
#                 | openmpi | mpich | impi | mvapich; MASTER_ADDR defaults to the first host.
#                 Extra launcher flags: DS_LAUNCHER_ARGS="..." (e.g. "-x NCCL_DEBUG" for openmpi).
set -euo pipefail
PYTHON=${PYTHON:-python}
# the launcher starts its workers with `python`: make that the same interpreter (and its ninja,
# which JIT-builds DeepSpeed ops; two ninja versions rebuild them for each other)
PATH="$(dirname "$(command -v "$PYTHON")"):$PATH"
export PATH OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ -z "${MASTER_PORT:-}" ] && [ -z "${HOSTFILE:-}" ]; then
    # one node: a free port (the launcher's default 29500 may be another job's)
    MASTER_PORT=$("$PYTHON" -m mmpretrain.preflight --free-port)
elif [ -z "${HOSTFILE:-}" ]; then
    # a port given on one node: one line now if another process holds it
    "$PYTHON" -m mmpretrain.preflight --check-port "${MASTER_ADDR:-127.0.0.1}" "$MASTER_PORT" || exit 2
fi
args=(--master_port "${MASTER_PORT:-29500}")
[ -n "${NUM_GPUS:-}" ] && args+=(--num_gpus "$NUM_GPUS")
[ -n "${MASTER_ADDR:-}" ] && args+=(--master_addr "$MASTER_ADDR")
if [ -n "${HOSTFILE:-}" ]; then
    args+=(--hostfile "$HOSTFILE" --launcher "${DS_LAUNCHER:-pdsh}")
    [ -n "${DS_LAUNCHER_ARGS:-}" ] && args+=(--launcher_args "$DS_LAUNCHER_ARGS")
fi
exec "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --module mmpretrain.train "$@"
