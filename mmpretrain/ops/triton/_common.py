"""Helpers shared by the Triton kernels: interpreter detection and autotune configs."""
from __future__ import annotations

import os
from typing import Dict, List

import torch
import triton

# Decided once, like triton.jit itself decides at decoration time.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def configs(gpu: List[Dict[str, int]], fixed: Dict[str, int]) -> List[triton.Config]:
    """Several configs on a GPU; one fixed config under the interpreter, where benchmarking
    several would need a GPU driver."""
    if INTERPRET:
        return [triton.Config(dict(fixed), num_warps=4, num_stages=1)]
    out = []
    for c in gpu:
        c = dict(c)
        warps, stages = c.pop("num_warps", 4), c.pop("num_stages", 2)
        out.append(triton.Config(c, num_warps=warps, num_stages=stages))
    return out


def usable(t: torch.Tensor) -> bool:
    """Can a kernel run on this tensor's device at all (GPU, or CPU under the interpreter)?"""
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def upcast(dtype: torch.dtype) -> bool:
    """Convert loads to fp32 right away: fp32 inputs trivially, and every dtype under the
    interpreter, whose bf16/fp16 numpy arithmetic is wrong or lossy."""
    return INTERPRET or dtype == torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tf32 would cost ~1e-3 relative error); 16-bit: tensor cores
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def bucket(n: int) -> int:
    """Autotune key for a length: the next power of two, so varying lengths share a tuning."""
    return triton.next_power_of_2(max(int(n), 16))
