"""Where rank 0's metric records go besides metrics.jsonl (`log.report_to`): TensorBoard event files
under `<output_dir>/tensorboard/` and a wandb run whose id is kept in `<output_dir>/wandb_id`, so
that a restart, resume or requeue of the same run directory continues the same wandb run and the
same TensorBoard step axis instead of opening a new one.

What is logged: the numeric fields of each record (losses, lr, temperatures, throughput, eval
metrics) at the record's global step. Train records keep their field names (`loss`, `lr`,
`loss/image_text`); other kinds are prefixed with the kind (`eval/zeroshot/image/accuracy`,
`budget/step_s`). `step`, `time`, booleans and non-numbers are left out.

How `log.report_to` and `log.wandb.mode` combine: wandb is on when `wandb` is listed in
`log.report_to` or `log.wandb.mode` is `offline` / `online` (the older switch, still honoured).
When on, it runs in `log.wandb.mode` (offline / online; `disabled` with wandb listed means online),
unless `WANDB_MODE` is set in the environment, which wins (WANDB_MODE=disabled turns it off without
importing wandb)."""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

log = logging.getLogger("mmpretrain")

WANDB_ID_FILE = "wandb_id"
TENSORBOARD_DIR = "tensorboard"
_SKIP = {"step", "time", "kind"}
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Backend:
    """One destination of the metric records; rank 0 only."""

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def scalars(record: Mapping[str, Any]) -> Dict[str, float]:
    """The numeric fields of a record as tag -> value (see the module doc for the tag names)."""
    kind = record.get("kind", "train")
    prefix = "" if kind == "train" else f"{kind}/"
    out: Dict[str, float] = {}
    for k, v in record.items():
        if k in _SKIP:
            continue
        if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:  # 0-d tensors / numpy scalars
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[prefix + k] = v
    return out


# ----------------------------------------------------------------------------- which backends


def wandb_mode(cfg: Any, env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The mode wandb runs in (see the module doc), or None when wandb is off."""
    env = os.environ if env is None else env
    listed = "wandb" in cfg.log.report_to
    if not listed and cfg.log.wandb.mode == "disabled":
        return None
    forced = env.get("WANDB_MODE", "").strip()
    if forced:
        return None if forced == "disabled" else forced
    return cfg.log.wandb.mode if cfg.log.wandb.mode != "disabled" else "online"


def missing_packages(cfg: Any, env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """A one-line problem when a requested backend's package is not installed (preflight), else None."""
    need = []
    if "tensorboard" in cfg.log.report_to:
        need.append(("tensorboard", "log.report_to", list(cfg.log.report_to)))
    if wandb_mode(cfg, env) is not None:
        listed = "wandb" in cfg.log.report_to
        need.append(("wandb", *(("log.report_to", list(cfg.log.report_to)) if listed
                                else ("log.wandb.mode", cfg.log.wandb.mode))))
    for module, key, value in need:
        if importlib.util.find_spec(module) is None:
            return (f"config key '{key}' = {value!r} needs the '{module}' package, which is not installed: "
                    f"pip install 'mmpretrain[{module}]'")
    return None


def build(cfg: Any, start_step: int = 0, env: Optional[Mapping[str, str]] = None) -> List[Backend]:
    """The backends `cfg` asks for (jsonl is MetricsLogger's own file, not one of these)."""
    out: List[Backend] = []
    if "tensorboard" in cfg.log.report_to:
        out.append(TensorBoardBackend(cfg.run.output_dir, start_step))
    mode = wandb_mode(cfg, env)
    if mode is not None:
        out.append(WandbBackend(cfg, mode))
    elif "wandb" in cfg.log.report_to:
        log.info("wandb is listed in log.report_to but WANDB_MODE=disabled: not logging to wandb")
    return out


# ----------------------------------------------------------------------------- tensorboard


class TensorBoardBackend(Backend):
    """Scalars into `<output_dir>/tensorboard/`, one events file per segment of the run. A segment
    resumed at step S marks steps > S of earlier segments as purged (SummaryWriter's purge_step):
    steps a crashed segment logged past its last checkpoint are trained again, and TensorBoard
    shows the new values only, on one monotone axis."""

    def __init__(self, output_dir: str, start_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package ([tensorboard] extra)

        self.log_dir = Path(output_dir) / TENSORBOARD_DIR
        # a fresh start (step 0) hides everything an earlier attempt in this directory wrote
        purge = start_step + 1 if start_step > 0 else 0
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge, flush_secs=30)

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        for tag, v in scalars(record).items():
            self.writer.add_scalar(tag, v, global_step=step)

    def close(self) -> None:
        self.writer.close()


# ----------------------------------------------------------------------------- wandb


def wandb_run_id(output_dir: str) -> str:
    """The run directory's wandb id: read from `<output_dir>/wandb_id`, or generated and written
    there (atomically) on the first start. Python's hash() is salted per process, so an id derived
    from it opened a new wandb run on every restart; this one is the same for every segment."""
    path = Path(output_dir) / WANDB_ID_FILE
    if path.is_file():
        found = path.read_text().strip()
        if _ID_RE.match(found):
            return found
        log.warning("%s holds %r, not a wandb run id: starting a new wandb run", path, found[:80])
    new = uuid.uuid4().hex[:12]  # wandb ids: letters, digits, '-', '_'
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{WANDB_ID_FILE}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(new + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return new


class WandbBackend(Backend):
    """A wandb run resumed (resume='allow') under the run directory's stable id, so each segment
    of a requeued run appends to the same run and step axis. wandb drops steps below the run's
    current step (those a crashed segment logged past its last checkpoint keep their first values)."""

    def __init__(self, cfg: Any, mode: str) -> None:
        import wandb  # optional ([wandb] extra)

        from mmpretrain.config import to_dict

        os.environ.setdefault("WANDB_SILENT", "true")
        self.id = wandb_run_id(cfg.run.output_dir)
        self.run = wandb.init(
            project=cfg.log.wandb.project,
            entity=cfg.log.wandb.entity,
            name=cfg.run.name,
            mode=None if os.environ.get("WANDB_MODE") else mode,  # wandb reads WANDB_MODE itself
            dir=cfg.run.output_dir,
            config=to_dict(cfg),
            id=self.id,
            resume="allow",
        )
        log.info("wandb run %s (%s mode; id kept in %s)", self.id, mode, Path(cfg.run.output_dir) / WANDB_ID_FILE)

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() returns before wandb's service has written the run's files: shut it down so they
        # are complete when close() returns (a requeue may kill the process soon after)
        if hasattr(wandb, "teardown"):
            wandb.teardown()
