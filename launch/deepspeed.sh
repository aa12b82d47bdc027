#!/usr/bin/env bash
# Launch `python -m mmpretrain.train` with the deepspeed launcher. Arguments go to the trainer.
#   single node:  NUM_GPUS=8 launch/deepspeed.sh --config configs/base.yaml [key=value ...]
#                 (MASTER_PORT: the rendezvous port; default: a free one)
#   on CPU:       NUM_GPUS=2 (the number of processes; the flag is --num_gpus/--num_accelerators)
#   multi-node:   HOSTFILE=launch/hostfile launch/deepspeed.sh --config ...   (see hostfile.example)
#                 DS_LAUNCHER=pdsh (default: ssh to each host) | slurm (srun inside an allocation)
#                 | openmpi | mpich | impi | mvapich; MASTER_ADDR defaults to the first host.
#                 Extra launcher flags: DS_LAUNCHER_ARGS="..." (e.g. "-x NCCL_DEBUG" for openmpi).
#                 The other nodes get PATH, OMP_NUM_THREADS, TORCH_*, WANDB_*, HF_*, TRITON_*, GLOO_*,
#                 MMPRETRAIN_* (and variables matching the regex MMP_FORWARD_ENV) unless DS_ENV_FILE is set.
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
    [ -r "$HOSTFILE" ] || { echo "launch/deepspeed.sh: HOSTFILE=$HOSTFILE cannot be read" >&2; exit 2; }
    if [ -z "${MASTER_ADDR:-}" ]; then
        # rank 0's node: the first host of the hostfile (by name, resolved on every node, instead of
        # the launcher's `ssh HOST hostname -I`, whose first address may be on the wrong network)
        MASTER_ADDR=$(awk '!/^[[:space:]]*(#|$)/ { print $1; exit }' "$HOSTFILE")
        [ -n "$MASTER_ADDR" ] || { echo "launch/deepspeed.sh: no host in HOSTFILE=$HOSTFILE" >&2; exit 2; }
        args+=(--master_addr "$MASTER_ADDR")
    fi
    args+=(--hostfile "$HOSTFILE" --launcher "${DS_LAUNCHER:-pdsh}")
    [ -n "${DS_LAUNCHER_ARGS:-}" ] && args+=(--launcher_args "$DS_LAUNCHER_ARGS")
    if [ -z "${DS_ENV_FILE:-}" ]; then
        # the launcher forwards only PYTHON*/NCCL*/UCX* variables to the other nodes (pdsh runs a
        # bare ssh shell there): forward what the trainer reads too, through its DS_ENV_FILE
        DS_ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/mmpretrain-dsenv.XXXXXX")
        trap 'rm -f "$DS_ENV_FILE"' EXIT
        env | grep -E "^(PATH|LD_LIBRARY_PATH|OMP_NUM_THREADS|TORCH_EXTENSIONS_DIR|TORCH_[A-Z_]*|WANDB_[A-Z_]*|HF_[A-Z_]*|TRANSFORMERS_[A-Z_]*|TRITON_[A-Z_]*|GLOO_[A-Z_]*|MMPRETRAIN_[A-Z_]*|CUDA_HOME|DS_ACCELERATOR|${MMP_FORWARD_ENV:-MMP_FORWARD_ENV})=" \
            | grep -v $'\t' > "$DS_ENV_FILE" || true
        export DS_ENV_FILE
        # not exec: the trap removes the file when the launcher ends
        "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --module mmpretrain.train "$@"
        exit $?
    fi
fi
exec "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" --module mmpretrain.train "$@"
