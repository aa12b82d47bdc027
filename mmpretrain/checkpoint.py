"""Checkpoints: DeepSpeed state + every rank's RNG and data position + trainer state,
committed atomically (a `COMPLETE` marker after a barrier, then `latest`), keep-last-K,
and resume from the newest complete one. `CheckpointManager` owns a run's resume (what to
load and how) and its save cadence; the functions below are its parts."""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from mmpretrain import distributed as D
from mmpretrain import faults
from mmpretrain.config import Config, config_hash, to_yaml
from mmpretrain.safe_load import UnsafeCheckpointError, safe_load, use_safe_engine, verify_files, verify_safe

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


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave the old file plus a torn temp
        raise


# exit code of a run stopped because a checkpoint could not be written (sysexits EX_IOERR)
CHECKPOINT_WRITE_EXIT_CODE = 74
DISK_FULL_EXIT_CODE = CHECKPOINT_WRITE_EXIT_CODE


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, I/O error). Raised on every rank
    together (the save is collective); the partial step directory is removed and `latest` still
    names the last good checkpoint. The message is one line: directory, bytes needed and free,
    and the last good checkpoint. The trainer maps it to CHECKPOINT_WRITE_EXIT_CODE."""

    def __init__(self, message: str, root: Path, last_good: Optional[Path], no_space: bool):
        super().__init__(message)
        self.root, self.last_good, self.no_space = root, last_good, no_space


_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def _write_error_message(root: Path, step: int, err: Optional[BaseException]) -> CheckpointWriteError:
    """Every rank builds the same one-line error from the disk's state (not from its own error,
    which only some ranks have)."""
    good = complete_checkpoints(root)
    last_good = good[-1] if good else None
    needed = _dir_bytes(last_good) if last_good is not None else None
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = -1
    code = getattr(err, "errno", None)
    text = str(err) if err is not None else "failed on another rank"
    no_space = code in _NO_SPACE_ERRNOS or "No space left" in text or "file write failed" in text \
        or "unexpected pos" in text or (needed is not None and 0 <= free < needed)
    what = "no space left on device" if no_space else f"write failed ({type(err).__name__ if err else 'another rank'}: {text.splitlines()[0][:200] if text else ''})"
    need = f"needs ~{needed} bytes (the size of the last checkpoint)" if needed is not None else "needs more space than is free"
    keep = (f"the last good checkpoint is {last_good} ('latest' is unchanged; resume from it)" if last_good is not None
            else "no checkpoint of this run is complete yet")
    msg = (f"checkpoint save at step {step} failed: {what} in {root}; {need}, {free} bytes free; "
           f"partial {tag_for(step)} removed; {keep}")
    return CheckpointWriteError(msg, root, last_good, no_space)


class _GuardedWrites:
    """While active, DeepSpeed's file writes (its checkpoint engine's save and the recovery script
    copy) record the first failure instead of raising, so the failing rank still reaches every
    collective of engine.save_checkpoint and all ranks can stop together afterwards."""

    def __init__(self, engine) -> None:
        self.engine, self.error = engine, None  # type: Optional[BaseException]
        self._undo: List[Callable[[], None]] = []

    def _wrap(self, obj: Any, name: str) -> None:
        if obj is None or not hasattr(obj, name):
            return
        orig, had_own = getattr(obj, name), name in vars(obj)

        def guarded(*a: Any, **k: Any) -> Any:
            if self.error is not None:
                return None  # the save is lost already: write nothing more
            try:
                return orig(*a, **k)
            except (OSError, RuntimeError) as e:
                self.error = e
                return None

        setattr(obj, name, guarded)
        self._undo.append(lambda: setattr(obj, name, orig) if had_own else delattr(obj, name))

    def __enter__(self) -> "_GuardedWrites":
        self._wrap(getattr(self.engine, "checkpoint_engine", None), "save")
        self._wrap(self.engine, "_copy_recovery_script")
        return self

    def __exit__(self, *exc: Any) -> None:
        for undo in reversed(self._undo):
            undo()


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint dirs holding a COMPLETE marker, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name) and (p / "COMPLETE").exists()]
    return sorted(found, key=lambda p: int(_TAG.match(p.name).group(1)))


def find_resume(root: Path, spec: str) -> Optional[Path]:
    """`auto` -> newest complete checkpoint under root (or None); `never` -> None; a path -> that
    checkpoint, unless root already holds newer ones that started from it (trainer state `origin`):
    a requeued job re-runs the same command and must continue, not start over."""
    if spec == "never":
        return None
    if spec == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / "COMPLETE").exists():
        raise FileNotFoundError(f"train.resume='{spec}': no COMPLETE marker in that directory (incomplete or not a checkpoint)")
    descendants = [c for c in complete_checkpoints(root) if read_trainer_state(c).get("origin") == origin_of(path)]
    if descendants and descendants[-1].resolve() != path.resolve():
        log.info("train.resume=%s: this run already continued from it; resuming from %s", spec, descendants[-1])
        return descendants[-1]
    return path


def origin_of(ckpt: Path) -> str:
    """How a run records the explicit checkpoint it started from."""
    return str(Path(ckpt).resolve())


def write_checkpoint(engine, root: Path, step: int, trainer_state: Dict[str, Any], rank_state: Dict[str, Any],
                     config_yaml: str, keep_last: int, write_shared: Optional[Callable[[Path], None]] = None) -> Path:
    """Collective: every rank must call it. Returns the checkpoint directory. `write_shared(ckpt)`:
    rank 0 writes state every rank holds alike (the EMA) into the step directory, before the commit."""
    t0 = time.perf_counter()
    tag = tag_for(step)
    ckpt = root / tag
    rank = D.rank()
    if rank == 0 and ckpt.exists():
        shutil.rmtree(ckpt)  # a leftover partial save of the same step
    D.barrier()
    err: Optional[BaseException] = None
    # our own `latest` (below) replaces DeepSpeed's, which it writes before its last barrier
    with _GuardedWrites(engine) as guard:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    err = guard.error
    if err is None:
        try:
            torch.save({"rng": rng_state(), **rank_state}, ckpt / f"rank_{rank:05d}.pt")
            if rank == 0 and write_shared is not None:
                write_shared(ckpt)
        except (OSError, RuntimeError) as e:
            err = e
    faults.point("checkpoint.rank_files_written", step=step, rank=rank)  # crash tests kill a rank here
    _stop_together_if_failed(root, ckpt, step, err)  # a barrier: every rank's files are on disk
    if rank == 0:
        try:
            commit_checkpoint(root, ckpt, step, json.dumps(trainer_state, indent=1), config_yaml)
        except OSError as e:
            err = e
    _stop_together_if_failed(root, ckpt, step, err)
    if rank == 0:
        retain(root, step, keep_last)
    D.barrier()
    if rank == 0:
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        log.info("saved checkpoint %s (%.1f MiB, %.2f s)", ckpt, size / 2**20, time.perf_counter() - t0)
    return ckpt


def commit_checkpoint(root: Path, ckpt: Path, step: int, trainer_state_json: str, config_yaml: str) -> None:
    """Rank 0, once every rank's files are on disk: the step's own files, then COMPLETE, then
    `latest` (each atomic: a kill between two leaves the last complete checkpoint in charge)."""
    atomic_write(ckpt / "trainer_state.json", trainer_state_json)
    atomic_write(ckpt / "config.yaml", config_yaml)
    atomic_write(ckpt / "COMPLETE", f"{step}\n")
    atomic_write(root / "latest", ckpt.name + "\n")


def remove_partial(ckpt: Path) -> None:
    (ckpt / "COMPLETE").unlink(missing_ok=True)  # first, so a half-removed dir is never taken as complete
    shutil.rmtree(ckpt, ignore_errors=True)


def retain(root: Path, step: int, keep_last: int) -> None:
    """Rank 0, after the commit of `step`: keep the newest `keep_last` complete checkpoints and
    remove partial saves of earlier steps (killed mid-save)."""
    for old in complete_checkpoints(root)[:-keep_last]:
        remove_partial(old)
        shutil.rmtree(universal_dir(old), ignore_errors=True)
    for d in root.glob("step_*"):
        m = _TAG.match(d.name)
        if m and int(m.group(1)) < step and not (d / "COMPLETE").exists():
            shutil.rmtree(d, ignore_errors=True)


def _stop_together_if_failed(root: Path, ckpt: Path, step: int, err: Optional[BaseException]) -> None:
    """Collective (also the barrier of the save): when any rank could not write its part, rank 0
    removes the partial step directory and every rank raises the same CheckpointWriteError."""
    if not D.any_rank(err is not None):
        return
    if err is not None:
        log.error("rank %d could not write its part of %s: %s: %s", D.rank(), ckpt, type(err).__name__, err)
    if D.rank() == 0:
        remove_partial(ckpt)
    D.barrier()
    exc = _write_error_message(root, step, err)
    log.error("%s", exc)
    raise exc


@dataclass
class ResumePlan:
    """How to resume `ckpt`: `exact` (same world size and ZeRO stage), `universal` (another
    world size: DeepSpeed universal checkpoint) or `weights_only` (another ZeRO stage)."""

    ckpt: Path
    mode: str
    trainer_state: Dict[str, Any]


def read_trainer_state(ckpt: Path) -> Dict[str, Any]:
    return json.loads((Path(ckpt) / "trainer_state.json").read_text())


def plan_resume(ckpt: Path, world_size: int, zero_stage: int) -> ResumePlan:
    state = read_trainer_state(ckpt)
    saved_world, saved_stage = state.get("world_size"), state.get("zero_stage")
    if saved_stage != zero_stage:
        log.warning("checkpoint %s was written with ZeRO stage %s, this run uses %s: restarting from its "
                    "weights only (optimizer moments start from zero and the data stream restarts; the step "
                    "count and the LR schedule position carry on)", ckpt, saved_stage, zero_stage)
        return ResumePlan(Path(ckpt), "weights_only", state)
    if saved_world != world_size:
        log.warning("checkpoint %s was written by %s processes, this run has %s: loading it through a "
                    "DeepSpeed universal checkpoint", ckpt, saved_world, world_size)
        if zero_stage == 0:
            raise RuntimeError(f"{ckpt}: changing the world size needs ZeRO stage >= 1 (universal checkpoints)")
        return ResumePlan(Path(ckpt), "universal", state)
    return ResumePlan(Path(ckpt), "exact", state)


def universal_dir(ckpt: Path) -> Path:
    return ckpt.parent / f"{ckpt.name}_universal"


def ensure_universal(ckpt: Path) -> Path:
    """Collective. Rank 0 converts `ckpt` with DeepSpeed's ds_to_universal (once; the result
    sits beside it as `<tag>_universal` with its own COMPLETE marker). Equivalent command:
    python -m deepspeed.checkpoint.ds_to_universal --input_folder CKPT --output_folder CKPT_universal"""
    out = universal_dir(Path(ckpt))
    err: Optional[Exception] = None
    if D.rank() == 0 and not (out / "COMPLETE").exists():
        try:
            _convert_universal(Path(ckpt), out)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            err = e
    D.raise_together(err, RuntimeError(f"rank 0 could not convert {ckpt}; see its log"))
    return out


def _convert_universal(ckpt: Path, out: Path) -> None:
    verify_safe(ckpt)  # the converter unpickles the files without weights_only
    if out.exists():
        shutil.rmtree(out)
    workers = str(max(1, min(4, (os.cpu_count() or 1) // 2)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
           "--output_folder", str(out), "--num_extract_workers", workers, "--num_merge_workers", workers,
           "--no_strict"]
    log.info("converting to a universal checkpoint: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {ckpt} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    for name in ("trainer_state.json", "config.yaml"):
        shutil.copy2(ckpt / name, out / name)
    atomic_write(out / "COMPLETE", (ckpt / "COMPLETE").read_text())


def consolidated_state_dict(ckpt: Path) -> Dict[str, torch.Tensor]:
    """Full fp32 module state from a checkpoint of any ZeRO stage (keys without 'model.')."""
    ckpt = Path(ckpt)
    verify_safe(ckpt)
    if (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists() or list(ckpt.glob("*zero_pp_rank_0_*optim_states.pt")):
        # lazy: export / evaluate of stage-0 checkpoints and exports never load DeepSpeed (it logs to stdout)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:  # stage 0: the module file holds the full weights
        sd = safe_load(ckpt / "mp_rank_00_model_states.pt")["module"]
    prefix = "model."
    return {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}


def load_state_checked(model: torch.nn.Module, sd: Dict[str, torch.Tensor], where: "str | Path") -> None:
    """load_state_dict that names the file and the first mismatching keys when they do not fit."""
    from mmpretrain.models import zero3

    missing, unexpected = zero3.load_state_dict(model, sd)  # also a model built under zero.Init
    if missing or unexpected:
        raise RuntimeError(f"{where}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def load_consolidated_weights(model: torch.nn.Module, ckpt: Path) -> None:
    load_state_checked(model, consolidated_state_dict(ckpt), ckpt)
    log.info("loaded weights only from %s", ckpt)


def resolve_checkpoint(path: "str | Path") -> Path:
    """A complete `step_*` directory from a run dir, a checkpoints dir or the step dir itself."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint '{p}' does not exist")
    if (p / "COMPLETE").is_file():
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    found = find_resume(root, "auto")
    if found is None:
        raise FileNotFoundError(f"'{p}' holds no complete checkpoint (no step_*/COMPLETE under {root})")
    return Path(found)


def _rank_files(ckpt: Path, rank: int) -> List[Path]:
    """The files this rank reads on an exact resume."""
    return [f for f in ckpt.glob("*.pt") if f"zero_pp_rank_{rank}_" in f.name
            or f.name in ("mp_rank_00_model_states.pt", f"rank_{rank:05d}.pt")]


def _agree_safe(src: Path, mode: str) -> None:
    """Collective. Every rank checks what it will unpickle before DeepSpeed's loader starts (whose
    collectives would hang if one rank stopped inside it), and all ranks stop together."""
    err: Optional[Exception] = None
    try:
        if mode == "universal":  # ZeRO's universal loader calls torch.load(weights_only=False) itself
            verify_safe(src)
        else:
            verify_files(_rank_files(src, D.rank()))
    except Exception as e:  # noqa: BLE001 - a missing or unreadable file too: every rank stops together
        err = e
    D.raise_together(err, UnsafeCheckpointError(f"another rank refused a file of {src}; see its log"))


def restore_checkpoint(engine, plan: ResumePlan, load_optimizer: bool = True) -> Dict[str, Any]:
    """Collective. Restores engine state and this rank's RNG; returns trainer and rank state."""
    t0 = time.perf_counter()
    out = _load(engine, plan, load_optimizer)
    log.info("checkpoint loaded in %.2f s", time.perf_counter() - t0)
    return out


def _load(engine, plan: ResumePlan, load_optimizer: bool) -> Dict[str, Any]:
    ckpt = plan.ckpt
    if plan.mode == "weights_only":  # weights went into the module before the engine was built
        return {"trainer": plan.trainer_state, "rank": {}}
    src = universal_dir(ckpt) if plan.mode == "universal" else ckpt  # converted by ensure_universal
    _agree_safe(src, plan.mode)
    use_safe_engine(engine)
    engine.load_checkpoint(
        str(src.parent), tag=src.name, load_optimizer_states=load_optimizer, load_lr_scheduler_states=load_optimizer
    )
    trainer_state = plan.trainer_state
    if plan.mode == "universal":
        log.info("resumed from %s via %s (step %d)", ckpt, src, trainer_state["step"])
        return {"trainer": trainer_state, "rank": {}}
    rank_file = ckpt / f"rank_{D.rank():05d}.pt"
    if not rank_file.exists():
        raise FileNotFoundError(f"{rank_file} is missing: the checkpoint is incomplete or from another world size")
    rank_state = safe_load(rank_file)
    set_rng_state(rank_state.pop("rng"))
    log.info("resumed from %s (step %d)", ckpt, trainer_state["step"])
    return {"trainer": trainer_state, "rank": rank_state}


def move_schedule(scheduler, step: int) -> None:
    """Put a LambdaLR schedule where an uninterrupted run has it after `step` steps (last_epoch =
    step, lr = base lr x lambda(step)), the state loading its saved state_dict would give. For a
    resume that restored no schedule (weights only)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        raise TypeError(f"cannot move a {type(scheduler).__name__} to step {step}: only LambdaLR schedules")
    lrs = [base * fn(step) for fn, base in zip(lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": step, "_last_lr": list(lrs)})


@dataclass
class Progress:
    """The trainer's counters a checkpoint carries (what `CheckpointManager.load` gives back)."""

    step: int = 0
    samples_seen: int = 0
    modality_counts: Dict[str, int] = field(default_factory=dict)  # empty when starting fresh
    nonfinite_total: int = 0
    train_seconds: float = 0.0  # wall-clock seconds of the training loop so far (train.max_minutes)
    schedule_total: Optional[int] = None  # the step count train.max_minutes decided (None: train.steps)


class CheckpointManager:
    """Owns a run's resume and its save cadence (after torchtitan's CheckpointManager).

    1. `CheckpointManager(cfg, info, root)` before the engine exists: finds the checkpoint
       (`train.resume` = auto | never | PATH; a requeued PATH run continues from its own newest
       descendant) and plans how to resume it: `exact` (same world size and ZeRO stage),
       `universal` (another world size) or `weights_only` (another ZeRO stage). Engine
       construction reads `prepare_model(model)` (weights-only: load the weights before ZeRO
       partitions the module), `load_universal` (the DeepSpeed config flag) and `data_seed`
       (the loader's seed: moved on by seed + step after a non-exact resume).
    2. `load(engine, scheduler, loader)` once, collective: restores engine state, RNG and the
       loader position (exact) or moves the LR schedule to the step (weights only); returns the
       trainer's `Progress`.
    3. `save(step, progress)` after every step, collective: saves every `train.save_every` steps,
       when `train.save_every_minutes` passed on any rank (the ranks agree), and with `last=True`
       unless this step is saved already. `save_now` saves at once (preemption).
    4. `train.async_save`: a periodic save snapshots the state in memory and returns while a
       background thread writes it (mmpretrain.async_checkpoint); at most one is pending (the next
       save waits for it), and the final save, `save_now` and `close()` wait until it is committed.
       A failed background write raises CheckpointWriteError at the next save (on every rank)."""

    def __init__(self, cfg: Config, info: D.DistInfo, root: "str | Path") -> None:
        self.cfg, self.info, self.root = cfg, info, Path(root)
        self.config_yaml = to_yaml(cfg)
        ckpt = find_resume(self.root, cfg.train.resume)
        self.plan: Optional[ResumePlan] = plan_resume(ckpt, info.world_size, cfg.train.zero_stage) if ckpt else None
        self.mode: Optional[str] = self.plan.mode if self.plan is not None else None
        saved = self.plan.trainer_state if self.plan is not None else {}
        self.load_universal = self.mode == "universal"
        self.data_seed: int = saved.get("data_seed", cfg.run.seed)
        if self.mode in ("universal", "weights_only"):
            log.warning("resume mode '%s': the data stream restarts (seed + step); exact data order "
                        "is kept only for the same world size", self.mode)
            self.data_seed += saved["step"]
        # the explicit checkpoint this run started from (train.resume=PATH), kept by later saves
        explicit = self.plan is not None and cfg.train.resume not in ("auto", "never") and \
            self.plan.ckpt.resolve() == Path(cfg.train.resume).resolve()
        self.origin: Optional[str] = origin_of(self.plan.ckpt) if explicit else saved.get("origin")
        own = self.mode == "exact" and self.plan.ckpt.parent.resolve() == self.root.resolve()
        self.last_saved_step: int = saved["step"] if own else -1
        self._prepared = False
        self._engine: Any = None
        self._loader: Any = None
        self._last_save_time = time.time()
        # set by the trainer before load(): the EMA of the weights (mmpretrain.ema.WeightEMA), saved
        # by rank 0 into every checkpoint and restored on every kind of resume
        self.ema: Any = None
        self._async: Any = None
        if cfg.train.async_save:
            from mmpretrain.async_checkpoint import AsyncCheckpointWriter

            self._async = AsyncCheckpointWriter(cfg.train.dist_timeout_minutes)

    # ------------------------------------------------------------------ resume
    def prepare_model(self, model: torch.nn.Module) -> None:
        """Call with the built model before the engine wraps it: a weights-only resume loads the
        checkpoint's consolidated weights now, before ZeRO partitions the module."""
        self._prepared = True
        if self.mode == "weights_only":
            load_consolidated_weights(model, self.plan.ckpt)

    def load(self, engine, scheduler, loader) -> Progress:
        """Collective, once, after the engine and the loader exist (the loader before the RNG is
        restored, as in an uninterrupted run). Starting fresh returns `Progress()`."""
        if self._engine is not None:
            raise RuntimeError("CheckpointManager.load() was called twice")
        if self.plan is not None and not self._prepared:
            raise RuntimeError("CheckpointManager.prepare_model(model) must run before the engine is built")
        self._engine, self._loader = engine, loader
        self._last_save_time = time.time()
        if self.plan is None:
            return Progress()
        if self.mode == "universal":
            ensure_universal(self.plan.ckpt)  # rank 0 converts once; every rank waits
        state = restore_checkpoint(engine, self.plan)
        t = state["trainer"]
        if self.mode == "exact":
            loader.load_state_dict(state["rank"]["data"])
        if self.ema is not None:
            self.ema.load(self.plan.ckpt)
        # train.max_minutes decided the schedule's length: keep it (a resume with the budget off
        # goes back to train.steps, like any other changed key)
        total = t.get("schedule_total") if self.cfg.train.max_minutes > 0 else None
        if total is not None:
            from mmpretrain.engine import set_schedule_total

            set_schedule_total(scheduler, self.cfg, total, move=False)
        if self.mode == "weights_only":  # no schedule was restored: carry its position on
            move_schedule(scheduler, t["step"])
        return Progress(step=t["step"], samples_seen=t["samples_seen"],
                        modality_counts=dict(t.get("modality_counts", {})), nonfinite_total=t.get("nonfinite_total", 0),
                        train_seconds=float(t.get("train_seconds", 0.0)), schedule_total=total)

    # ------------------------------------------------------------------ saving
    def save(self, step: int, progress: Callable[[], Progress], last: bool = False) -> Optional[Path]:
        """Collective: every rank calls it after every step with the same `step` and `last`.
        Saves when due (see the class); `progress` is called only then. Returns the directory
        written, or None."""
        due = self.last_saved_step != step if last else self._due(step)
        ckpt = self.save_now(step, progress, block=last) if due else None
        if last:
            self.wait()  # the final checkpoint (or this step's pending one) is committed before the run ends
        return ckpt

    def _due(self, step: int) -> bool:
        t = self.cfg.train
        due = bool(t.save_every and step % t.save_every == 0)
        if t.save_every_minutes > 0:  # clocks differ across ranks: any rank's deadline counts for all
            late = time.time() - self._last_save_time >= t.save_every_minutes * 60
            due = D.any_rank(late) or due
        return due and step != self.last_saved_step

    def save_now(self, step: int, progress: Callable[[], Progress], block: bool = True) -> Path:
        """Collective: save this step now (preemption). With train.async_save and `block=False` it
        returns once the state is snapshotted, while the files are written."""
        if self._engine is None:
            raise RuntimeError("CheckpointManager.load() must run before the first save")
        p = progress()
        if p.step != step:
            raise ValueError(f"saving step {step} with the counters of step {p.step}")
        trainer_state = {
            "step": step,
            "samples_seen": p.samples_seen,
            "modality_counts": dict(p.modality_counts),
            "config_hash": config_hash(self.cfg),
            "world_size": self.info.world_size,
            "zero_stage": self.cfg.train.zero_stage,
            "nonfinite_total": p.nonfinite_total,
            "data_seed": self.data_seed,
            "origin": self.origin,
            "train_seconds": p.train_seconds,
            "schedule_total": p.schedule_total,
        }
        rank_state = {"data": self._loader.state_dict()}
        if self._async is not None:
            from mmpretrain.ema import EMA_FILE

            shared = {EMA_FILE: self.ema.state_dict()} if self.ema is not None else {}
            ckpt = self._async.save(self._engine, self.root, step, trainer_state, rank_state, self.config_yaml,
                                    self.cfg.train.keep_last, shared)
        else:
            write_shared = self.ema.save if self.ema is not None else None
            ckpt = write_checkpoint(self._engine, self.root, step, trainer_state, rank_state,
                                    self.config_yaml, self.cfg.train.keep_last, write_shared=write_shared)
        self.last_saved_step = step
        self._last_save_time = time.time()
        if block:
            self.wait()
        return ckpt

    def wait(self) -> None:
        """Collective in effect (every rank reaches it at the same point): returns once the pending
        asynchronous save is committed; its failure raises CheckpointWriteError on every rank."""
        if self._async is not None:
            self._async.wait(self.root)

    def close(self) -> None:
        """Waits for a pending asynchronous save (a failure is only logged: the run is ending on
        another error) and frees its staging memory. Idempotent."""
        if self._async is not None:
            self._async.close()

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint of this run (None if there is none yet)."""
        return find_resume(self.root, "auto")
