"""`train.compile`: each tower's forward through `torch.compile` (the module compiled in place, so
parameter names and checkpoints do not change), dynamic shapes on (present-rows-only towers see
varying batch sizes). Where the backend cannot compile here (inductor without a C++ compiler on
CPU or without Triton on a GPU) the run says so once and stays eager; a graph dynamo cannot
compile at run time falls back to eager for that frame (torch._dynamo's suppress_errors)."""
from __future__ import annotations

import logging
import shutil
from typing import Optional

import torch
import torch.nn as nn

log = logging.getLogger("mmpretrain.compile")

BACKENDS = ("off", "inductor", "aot_eager", "eager")  # aot_eager / eager: no code generation (debugging)


def unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why `backend` cannot compile on `device` here, or None."""
    if backend != "inductor":
        return None
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return "inductor on a GPU needs Triton, which is not installed"
        return None
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return "inductor on CPU needs a C++ compiler (c++ / g++ / clang++), none is on PATH"
    return None


def compile_towers(model: nn.Module, backend: str, device: torch.device) -> int:
    """Compile every tower of `model` in place with `backend`; returns how many (0: off or fallback)."""
    if backend == "off":
        return 0
    why = unavailable(backend, device)
    if why:
        log.warning("train.compile=%s: %s; the towers run eager", backend, why)
        return 0
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a frame that fails to compile runs eager, not the run
    n = 0
    for tower in model.towers.values():
        tower.compile(backend=backend, dynamic=True)
        n += 1
    log.info("train.compile=%s: %d towers compiled (dynamic shapes)", backend, n)
    return n
