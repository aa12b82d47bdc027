"""Loading checkpoint files without running pickled code: `torch.load(weights_only=True)`
with an allowlist of the few plain DeepSpeed data classes its files hold.

DeepSpeed itself loads with `weights_only=False`; `use_safe_engine` swaps its checkpoint
engine for one that loads through `safe_load`, and `verify_safe` checks a directory before
DeepSpeed's converters (ds_to_universal, zero_to_fp32) unpickle it their own way.
"""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any, Iterable, List

import torch

# module.attribute of classes that are plain data (enums, dataclasses, a loss-scale holder)
_ALLOWED = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.zero.offload_config.OffloadDeviceEnum",
    "deepspeed.checkpoint.constants.ZeroStageEnum",
)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file would run code (or build objects we do not allow) when unpickled."""


def _allowed_globals() -> List[Any]:
    out = []
    for dotted in _ALLOWED:
        mod, _, name = dotted.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed version: that class simply is not allowed
    return out


def safe_load(path: "str | Path", map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load with weights_only=True; raises UnsafeCheckpointError naming the file when it
    would unpickle anything but tensors and plain data. `mmap`: map tensor data lazily (a cheap
    check of the pickle alone)."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:  # what weights_only raises for a forbidden global or opcode
        lines = str(e).strip().splitlines()
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else repr(e))
        raise UnsafeCheckpointError(f"refusing to load '{path}': it is not a weights-only file ({detail})") from None
    except Exception as e:  # truncated or not a torch file at all
        raise RuntimeError(f"cannot read checkpoint file '{path}': {type(e).__name__}: {e}") from None


def verify_safe(directory: "str | Path") -> None:
    """Every *.pt file under `directory` must load weights-only; raises otherwise."""
    verify_files(sorted(Path(directory).rglob("*.pt")))


def verify_files(files: Iterable["str | Path"]) -> None:
    """Check files weights-only without reading their tensor data (mmap where the format allows)."""
    for f in files:
        try:
            safe_load(f, mmap=True)
        except RuntimeError as e:
            if isinstance(e, UnsafeCheckpointError):
                raise
            safe_load(f)  # legacy (non-zip) format cannot be mmapped


def use_safe_engine(engine: Any) -> None:
    """Make a DeepSpeed engine load its checkpoint files through `safe_load`."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or getattr(ce, "_mmpretrain_safe", False):
        return

    def load(path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location if map_location is not None else "cpu")

    ce.load = load
    ce._mmpretrain_safe = True
