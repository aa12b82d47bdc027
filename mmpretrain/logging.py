"""Run logging: a log file per rank; on rank 0 the console (progress line or bar, end-of-run
summary: mmpretrain.console), metrics.jsonl and the log.report_to backends (tensorboard, wandb:
mmpretrain.report_backends))."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from mmpretrain import console as C
from mmpretrain import report_backends
from mmpretrain.config import Config

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
        ch.set_name(C.CONSOLE_HANDLER)  # mmpretrain.console draws its bar on this handler's stream
        ch.addFilter(lambda r: getattr(r, "console", True))  # records logged with extra=C.FILE_ONLY
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
        self.backends: List[report_backends.Backend] = []  # log.report_to: tensorboard / wandb (mmpretrain.report_backends)
        self.path = Path(cfg.run.output_dir) / "metrics.jsonl"
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a", buffering=1)
        self.summary = C.RunSummary()  # what the end-of-run block reports (finish())
        self.progress = C.Progress(cfg.log.progress, start_step, total_steps)
        # the wandb run id and the tensorboard step axis continue across resumes / requeues
        self.backends = report_backends.build(cfg, start_step)

    def log(self, record: Dict[str, Any], console: bool = True) -> None:
        if not self.enabled:
            return
        rec = {k: _jsonable(v) for k, v in record.items()}
        rec.setdefault("time", round(time.time(), 3))
        self.fh.write(json.dumps(rec) + "\n")
        if "step" in record:  # the raw record: NaN / inf stay numbers for the charts
            for b in self.backends:
                b.log(int(record["step"]), record)
        self.summary.add(rec)
        if console and "step" in rec and rec.get("kind", "train") == "train":
            self.progress.show(rec, self.total)  # log.progress: a line, a bar, or the log file only

    def finish(self, status: str, step: int, samples_seen: int, session_samples: int, world_size: int,
               checkpoint: Optional[Path]) -> Optional[Dict[str, Any]]:
        """End of the run (rank 0): the summary block on the console and the log, and a final
        `{"event": "summary", "kind": "summary", ...}` record in metrics.jsonl (tools read it)."""
        if not self.enabled:
            return None
        self.progress.close()
        rec = self.summary.record(status, step, self.total, samples_seen, step - self.start_step, session_samples,
                                  time.time() - self.t0, world_size, str(checkpoint) if checkpoint else None,
                                  str(self.path))
        rec["time"] = round(time.time(), 3)
        self.fh.write(json.dumps(rec) + "\n")  # metrics.jsonl only: no chart wants a summary point
        for line in C.summary_lines(rec):
            log.info(line)
        return rec

    def close(self) -> None:
        if not self.enabled:
            return
        self.progress.close()
        self.fh.close()
        for b in self.backends:  # one failing backend must not keep the others (or the run) from closing
            try:
                b.close()
            except Exception as e:  # noqa: BLE001
                log.warning("closing %s failed: %s", type(b).__name__, e)
        self.backends = []
