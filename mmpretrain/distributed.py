"""Rank/world discovery for every launcher (torchrun, deepspeed, accelerate, srun, mpirun),
process-group set-up, and collectives that carry gradients."""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from mmpretrain.preflight import free_port


class LaunchError(RuntimeError):
    """The launcher's environment is missing or inconsistent; the message names the variable."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | deepspeed | accelerate | env | openmpi | mpich | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# srun with one task per GPU and no MASTER_PORT: every task derives the same port from the
# job id (the sbatch scripts of mmpretrain.submit export the same value).
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000


def slurm_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job: SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN."""
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def _int(env: Mapping[str, str], name: str, hint: str = "") -> int:
    raw = env.get(name)
    if raw is None:
        raise LaunchError(f"environment variable {name} is not set{hint}")
    try:
        return int(raw.strip())
    except ValueError:
        raise LaunchError(f"environment variable {name}={raw!r} is not an integer") from None


def _slurm_first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist without scontrol: 'gpu-[007-009,012],x' -> 'gpu-007'."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level element (commas also appear inside [])
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def _slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node `node_id` from SLURM_TASKS_PER_NODE: '4(x2),2' -> [4, 4, 2][node_id]."""
    counts: List[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise LaunchError(f"environment variable SLURM_TASKS_PER_NODE={tasks_per_node!r} cannot be parsed")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise LaunchError(f"SLURM_NODEID={node_id} is outside SLURM_TASKS_PER_NODE={tasks_per_node!r}")
    return counts[node_id]


def _master(env: Mapping[str, str], world: int, launcher: str) -> Tuple[str, int]:
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if world > 1 and (not addr or port is None):
        missing = " and ".join(n for n, v in (("MASTER_ADDR", addr), ("MASTER_PORT", port)) if not v)
        raise LaunchError(f"WORLD_SIZE={world} ({launcher}) but {missing} is not set; export the address "
                          "and a free port of the rank-0 host (torchrun and deepspeed do this themselves)")
    if port is None:  # one process: its store is private, so any free port (two runs may share a host)
        return addr or "127.0.0.1", free_port()
    port_i = _int(env, "MASTER_PORT")
    if not 0 < port_i < 65536:
        raise LaunchError(f"environment variable MASTER_PORT={port_i} is not a TCP port (1-65535)")
    return addr or "127.0.0.1", port_i


def _check(rank: int, local_rank: int, world: int, local_world: int, names: Tuple[str, str, str, str]) -> None:
    r, lr, w, lw = names
    if world < 1:
        raise LaunchError(f"{w}={world} must be >= 1")
    if not 0 <= rank < world:
        raise LaunchError(f"{r}={rank} is outside [0, {w}={world})")
    if not 1 <= local_world <= world:
        raise LaunchError(f"{lw}={local_world} must be in [1, {w}={world}]")
    if not 0 <= local_rank < local_world:
        raise LaunchError(f"{lr}={local_rank} is outside [0, {lw}={local_world})")


def _single(env: Mapping[str, str]) -> DistInfo:
    addr, port = _master(env, 1, "single")
    return DistInfo(0, 0, 1, 1, addr, port, "single")


def _from_torch_env(env: Mapping[str, str]) -> DistInfo:
    """torchrun, the deepspeed launcher and accelerate export RANK/WORLD_SIZE/LOCAL_RANK;
    under `srun torchrun` these win over SLURM's per-task variables."""
    hint = " (RANK, WORLD_SIZE and LOCAL_RANK come together from torchrun/deepspeed/accelerate)"
    rank, world = _int(env, "RANK", hint), _int(env, "WORLD_SIZE", hint)
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    lw_name = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in env else "LOCAL_SIZE"  # deepspeed: LOCAL_SIZE
    local_world = _int(env, lw_name) if lw_name in env else world
    if any(k.startswith("ACCELERATE_") for k in env):
        launcher = "accelerate"
    elif "TORCHELASTIC_RUN_ID" in env:
        launcher = "torchrun"
    elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        launcher = "deepspeed"
    else:
        launcher = "env"
    _check(rank, local_rank, world, local_world, ("RANK", "LOCAL_RANK", "WORLD_SIZE", lw_name))
    addr, port = _master(env, world, launcher)
    return DistInfo(rank, local_rank, world, local_world, addr, port, launcher)


def _from_mpi(env: Mapping[str, str], names: Tuple[str, str, str, str], launcher: str) -> DistInfo:
    """mpirun (deepspeed --launcher openmpi|mpich|impi): MASTER_ADDR/PORT must be exported."""
    r, lr, w, lw = names
    rank, world = _int(env, r), _int(env, w)
    local_rank = _int(env, lr) if lr in env else rank
    local_world = _int(env, lw) if lw in env else world
    _check(rank, local_rank, world, local_world, names)
    addr, port = _master(env, world, launcher)
    return DistInfo(rank, local_rank, world, local_world, addr, port, launcher)


def _from_slurm(env: Mapping[str, str]) -> DistInfo:
    """srun with one task per process: SLURM_PROCID -> rank, SLURM_LOCALID -> local rank,
    SLURM_NTASKS -> world size; the address defaults to the first host of the step."""
    world = _int(env, "SLURM_NTASKS", " (srun sets it for every task)")
    if "SLURM_STEP_ID" not in env:  # the batch script itself, not a task of an srun step
        if world > 1:
            raise LaunchError(
                f"SLURM_NTASKS={world} but this process is not an srun task (SLURM_STEP_ID is not set): "
                "start one process per task with `srun python -m mmpretrain.train ...`, or use torchrun")
        return _single(env)
    rank = _int(env, "SLURM_PROCID")
    local_rank = _int(env, "SLURM_LOCALID", " (srun sets it for every task)")
    if "SLURM_TASKS_PER_NODE" in env:
        local_world = _slurm_tasks_on_node(env["SLURM_TASKS_PER_NODE"], _int(env, "SLURM_NODEID"))
        lw_name = "tasks on this node (SLURM_TASKS_PER_NODE)"
    else:
        lw_name = "SLURM_NTASKS_PER_NODE"
        local_world = _int(env, lw_name) if lw_name in env else world
    _check(rank, local_rank, world, local_world, ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", lw_name))
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist and world > 1:
            raise LaunchError("MASTER_ADDR and SLURM_JOB_NODELIST are both unset; cannot find the rank-0 host")
        addr = _slurm_first_host(nodelist) if nodelist else "127.0.0.1"
    if "MASTER_PORT" in env:
        port = _int(env, "MASTER_PORT")
    else:
        port = slurm_port(_int(env, "SLURM_JOB_ID", " and neither is MASTER_PORT"))
    return DistInfo(rank, local_rank, world, local_world, addr, port, "slurm")


def discover(env: Optional[Mapping[str, str]] = None) -> DistInfo:
    """Read rank and world from the environment the launcher set up.

    Precedence: torch-style RANK/WORLD_SIZE (torchrun, deepspeed, accelerate; they win under
    `srun torchrun`) > MPI (OMPI_COMM_WORLD_*, PMI_*) > SLURM task variables > one process.
    Raises LaunchError naming the variable that is missing, malformed or inconsistent."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        return _from_torch_env(env)
    if "OMPI_COMM_WORLD_RANK" in env or "OMPI_COMM_WORLD_SIZE" in env:
        return _from_mpi(env, ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE",
                               "OMPI_COMM_WORLD_LOCAL_SIZE"), "openmpi")
    if "PMI_RANK" in env or "PMI_SIZE" in env:
        return _from_mpi(env, ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE", "MPI_LOCALNRANKS"), "mpich")
    if "SLURM_PROCID" in env or "SLURM_STEP_ID" in env:
        return _from_slurm(env)
    return _single(env)


def init(info: DistInfo, timeout_minutes: float = 5.0) -> None:
    """Start the process group (NCCL on CUDA, gloo on CPU) through DeepSpeed; a collective that
    waits longer than `timeout_minutes` for a peer fails (train.dist_timeout_minutes)."""
    from .extensions import ensure_ops

    ensure_ops()  # DeepSpeed's shm op from the `make install` build: no JIT build, a build lock bounded
    import deepspeed  # lazy: rank discovery and config checks run (and fail fast) before DeepSpeed loads

    for k, v in (
        ("RANK", info.rank),
        ("LOCAL_RANK", info.local_rank),
        ("WORLD_SIZE", info.world_size),
        ("MASTER_ADDR", info.master_addr),
        ("MASTER_PORT", info.master_port),
    ):
        os.environ[k] = str(v)
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), verbose=False
    )
    _unlink_shm_buffers(info)


SHM_DIR = "/dev/shm"


def shm_buffer_path(info: DistInfo) -> str:
    """The shared-memory file DeepSpeed's CPU comm op creates for this rank when every rank is on one
    host (deepspeed/ops/csrc/cpu/comm/shm.cpp: deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK, 67 MB)."""
    return os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_{os.getuid()}_{info.master_addr}_{info.master_port}"
                                 f"_{info.rank}")


def _unlink_shm_buffers(info: DistInfo) -> None:
    """DeepSpeed never unlinks its shm buffers: each run on a fresh port left 67 MB per rank in
    /dev/shm for good (a test suite filled 17 GB). Once every rank has mapped every peer's buffer
    (they do so inside init_distributed; the barrier says all have returned), unlink ours: the
    mappings stay valid, and nothing is left behind, not even by a SIGKILL."""
    if info.world_size > 1:
        dist.barrier()  # on every rank alike (a stale file of an older run must not decide who waits)
    try:
        os.unlink(shm_buffer_path(info))
    except FileNotFoundError:
        pass


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for our slice.

    Written out (instead of torch.distributed.nn) so it runs on gloo, which lacks
    reduce_scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.n = x.shape[0]
        ctx.rank = dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each rank -> (world*n, ...) in rank order; gradients flow back."""
    if world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def comm_device() -> torch.device:
    """Where collective tensors must live: NCCL takes CUDA tensors only, gloo CPU ones."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each rank -> (world*n, ...) in rank order, on x's device."""
    if world_size() == 1:
        return x
    y = x.to(comm_device()).contiguous()
    parts: List[torch.Tensor] = [torch.empty_like(y) for _ in range(world_size())]
    dist.all_gather(parts, y)
    return torch.cat(parts, 0).to(x.device)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, on x's device (x itself is left unchanged)."""
    if world_size() > 1:
        y = x.to(comm_device(), copy=True)
        dist.all_reduce(y)
        x = y.to(x.device)
    return x


def any_rank(flag: bool) -> bool:
    """True on every rank when any rank passes True (a collective: every rank must call it)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def raise_together(err: Optional[BaseException], elsewhere: BaseException) -> None:
    """Collective: when any rank failed, every rank raises (its own error, or `elsewhere`), so no
    rank is left waiting in a later collective for one that stopped."""
    if any_rank(err is not None):
        raise err if err is not None else elsewhere


def barrier() -> None:
    if is_initialized():
        dist.barrier()
