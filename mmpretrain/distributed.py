"""Rank/world discovery for every launcher (torchrun, deepspeed, accelerate, srun),
process-group set-up, and collectives that carry gradients."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch
import torch.distributed as dist


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
    launcher: str  # torchrun | deepspeed | accelerate | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    if raw is None:
        raise LaunchError(f"environment variable {name} is not set")
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"environment variable {name}={raw!r} is not an integer") from None


def _slurm_first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist ('node[01-04],x' -> 'node01') without scontrol."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.split(",")[0].split("-")[0].rstrip("]")
        return prefix + first
    return head


def discover(env: Optional[Mapping[str, str]] = None) -> DistInfo:
    """Read rank and world from the environment the launcher set up."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        # torchrun, the deepspeed launcher and accelerate all export these
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        if "ACCELERATE_DYNAMO_BACKEND" in env or any(k.startswith("ACCELERATE_") for k in env):
            launcher = "accelerate"
        elif "DS_ACCELERATOR" in env or "CROSS_RANK" in env or env.get("TORCHELASTIC_RUN_ID") is None:
            launcher = "deepspeed"
        else:
            launcher = "torchrun"
        addr = env.get("MASTER_ADDR")
        port = env.get("MASTER_PORT")
        if world > 1 and (addr is None or port is None):
            raise LaunchError("WORLD_SIZE > 1 but MASTER_ADDR or MASTER_PORT is not set")
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        # srun with one task per GPU: SLURM's own variables are the truth
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID")
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0) or world
        launcher = "slurm"
        addr = env.get("MASTER_ADDR") or _slurm_first_host(env.get("SLURM_JOB_NODELIST", "localhost"))
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    else:
        return DistInfo(0, 0, 1, 1, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")), "single")
    if not 0 <= rank < world:
        raise LaunchError(f"rank {rank} is outside world size {world}")
    if not 0 <= local_rank < max(local_world, 1):
        raise LaunchError(f"local rank {local_rank} is outside local world size {local_world}")
    try:
        port_i = int(port) if port is not None else 29500
    except ValueError:
        raise LaunchError(f"environment variable MASTER_PORT={port!r} is not an integer") from None
    return DistInfo(rank, local_rank, world, local_world, addr or "127.0.0.1", port_i, launcher)


def init(info: DistInfo, timeout_minutes: float = 30.0) -> None:
    """Start the process group (NCCL on CUDA, gloo on CPU) through DeepSpeed."""
    import deepspeed

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


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    parts: List[torch.Tensor] = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def barrier() -> None:
    if is_initialized():
        dist.barrier()
