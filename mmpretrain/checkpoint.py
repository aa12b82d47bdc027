"""Checkpoints: DeepSpeed state + every rank's RNG and data position + trainer state,
committed atomically (a `COMPLETE` marker after a barrier, then `latest`), keep-last-K,
and resume from the newest complete one."""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from mmpretrain import distributed as D

log = logging.getLogger("mmpretrain.checkpoint")
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> Dict[str, Any]:
    """All RNG states as tensors and plain values, so they load with weights_only=True."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: Dict[str, Any] = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint dirs holding a COMPLETE marker, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name) and (p / "COMPLETE").exists()]
    return sorted(found, key=lambda p: int(_TAG.match(p.name).group(1)))


def find_resume(root: Path, spec: str) -> Optional[Path]:
    """`auto` -> newest complete checkpoint under root (or None); `never` -> None; else a path."""
    if spec == "never":
        return None
    if spec == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / "COMPLETE").exists():
        raise FileNotFoundError(f"train.resume='{spec}': no COMPLETE marker in that directory (incomplete or not a checkpoint)")
    return path


def save(engine, root: Path, step: int, trainer_state: Dict[str, Any], rank_state: Dict[str, Any], config_yaml: str, keep_last: int) -> Path:
    """Collective: every rank must call it. Returns the checkpoint directory."""
    tag = tag_for(step)
    ckpt = root / tag
    rank = D.rank()
    if rank == 0 and ckpt.exists():
        shutil.rmtree(ckpt)  # a leftover partial save of the same step
    D.barrier()
    # our own `latest` (below) replaces DeepSpeed's, which it writes before its last barrier
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save({"rng": rng_state(), **rank_state}, ckpt / f"rank_{rank:05d}.pt")
    D.barrier()  # every rank's files are on disk
    if rank == 0:
        _atomic_write(ckpt / "trainer_state.json", json.dumps(trainer_state, indent=1))
        _atomic_write(ckpt / "config.yaml", config_yaml)
        _atomic_write(ckpt / "COMPLETE", f"{step}\n")
        _atomic_write(root / "latest", tag + "\n")
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    log.info("saved checkpoint %s", ckpt)
    return ckpt


def load(engine, ckpt: Path, load_optimizer: bool = True) -> Dict[str, Any]:
    """Collective. Restores engine state and this rank's RNG; returns trainer and rank state."""
    ckpt = Path(ckpt)
    engine.load_checkpoint(
        str(ckpt.parent), tag=ckpt.name, load_optimizer_states=load_optimizer, load_lr_scheduler_states=load_optimizer
    )
    rank_file = ckpt / f"rank_{D.rank():05d}.pt"
    if not rank_file.exists():
        raise FileNotFoundError(
            f"{rank_file} is missing: the checkpoint was written by a different number of processes"
        )
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
    set_rng_state(rank_state.pop("rng"))
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    log.info("resumed from %s (step %d)", ckpt, trainer_state["step"])
    return {"trainer": trainer_state, "rank": rank_state}
