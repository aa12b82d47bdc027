"""Run logging: a log file per rank; on rank 0 the console (progress with ETA),
metrics.jsonl and wandb (online, offline or disabled)."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict

from mmpretrain.config import Config, to_dict

log = logging.getLogger("mmpretrain")


def setup_logging(output_dir: str, rank: int) -> None:
    """Each rank logs to logs/rank{N}.log; rank 0 also to the console."""
    logs = Path(output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("mmpretrain")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    root.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    fh = logging.FileHandler(logs / f"rank{rank}.log")
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if rank == 0:
        ch = logging.StreamHandler(sys.stdout)
        ch.setFormatter(fmt)
        root.addHandler(ch)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """Rank 0 writes; other ranks' calls are no-ops so the loop needs no rank checks."""

    def __init__(self, cfg: Config, rank: int, total_steps: int, start_step: int = 0) -> None:
        self.enabled = rank == 0
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.time()
        self.wandb = None
        self.path = Path(cfg.run.output_dir) / "metrics.jsonl"
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a", buffering=1)
        if cfg.log.wandb.mode != "disabled":
            import wandb  # optional ([wandb] extra)

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=cfg.log.wandb.project,
                entity=cfg.log.wandb.entity,
                name=cfg.run.name,
                mode=cfg.log.wandb.mode,
                dir=cfg.run.output_dir,
                config=to_dict(cfg),
                resume="allow",
                id=f"{cfg.run.name}-{abs(hash(cfg.run.output_dir)) % 10**8}",
            )

    def log(self, record: Dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        rec = {k: _jsonable(v) for k, v in record.items()}
        rec.setdefault("time", round(time.time(), 3))
        self.fh.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            step = rec.get("step")
            self.wandb.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=step)
        if console and "step" in rec and rec.get("kind", "train") == "train":
            log.info(self._progress_line(rec))

    def _progress_line(self, rec: Dict[str, Any]) -> str:
        step = rec["step"]
        done = max(step - self.start_step, 1)
        elapsed = time.time() - self.t0
        eta = elapsed / done * max(self.total - step, 0)
        parts = [f"step {step}/{self.total}", f"loss {_fmt(rec.get('loss'), '.4f')}"]
        for k in sorted(rec):
            if k.startswith("loss/"):
                parts.append(f"{k[5:]} {_fmt(rec[k], '.3f')}")
        parts += [f"lr {_fmt(rec.get('lr', 0), '.2e')}", f"{_fmt(rec.get('samples_per_s', 0), '.1f')} samples/s"]
        if rec.get("tflops_per_device") is not None:
            parts.append(f"{rec['tflops_per_device']:.3g} TFLOP/s/device"
                         + (f" (MFU {100 * rec['mfu']:.1f}%)" if rec.get("mfu") is not None else ""))
        if rec.get("peak_mem_mib") is not None:
            parts.append(f"peak mem {rec['peak_mem_mib']:.0f} MiB")
        parts.append(f"ETA {eta:.0f}s")
        if rec.get("nonfinite_steps"):
            parts.append(f"{rec['nonfinite_steps']} non-finite steps skipped")
        return " | ".join(parts)

    def close(self) -> None:
        if not self.enabled:
            return
        self.fh.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(v: Any, spec: str) -> str:
    """A number with `spec`; anything else (None, 'NaN' after _jsonable) as it is."""
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
