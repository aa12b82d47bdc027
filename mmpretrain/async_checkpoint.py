"""Asynchronous checkpoint saves (`train.async_save`): the training thread takes an in-memory
snapshot of every file a save writes (tensors copied into reused CPU staging buffers) and returns
to training; a background thread per rank writes the files, and the commit keeps the synchronous
save's order and guarantees: every rank's files, then `COMPLETE`, then `latest`, then retention.

Why not DeepSpeed's own DecoupledCheckpointEngine (deepspeed 0.19): it hands the live state dicts
to a spawned process through a multiprocessing queue, so on CPU the tensors are shared, not
copied, and training mutates them while they are written; and it needs the fast (aio) writer.
Here DeepSpeed's `engine.save_checkpoint` runs as usual (its collectives, names and layout), only
its checkpoint engine's `save(state, path)` calls are captured: the state is snapshotted and the
engine's own `save` writes the snapshot later, so the files hold exactly what a synchronous save
writes (same serialisation, same storage sharing)."""
from __future__ import annotations

import copy
import datetime
import json
import logging
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from mmpretrain import checkpoint as C
from mmpretrain import distributed as D
from mmpretrain import faults

log = logging.getLogger("mmpretrain.checkpoint")
_ATOMIC = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device)


class StagingPool:
    """CPU buffers for snapshots, kept from one save to the next (at most one save is pending, so
    about one snapshot's worth): copying into memory already touched is several times faster than
    into a fresh allocation, which page-faults every page in."""

    def __init__(self) -> None:
        self._free: Dict[Tuple[int, bool], List[torch.UntypedStorage]] = {}

    def take(self, nbytes: int, pin: bool) -> torch.UntypedStorage:
        free = self._free.get((nbytes, pin))
        if free:
            return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).untyped_storage()

    def give_back(self, storages: List[torch.UntypedStorage]) -> None:
        for s in storages:
            self._free.setdefault((s.nbytes(), s.is_pinned()), []).append(s)

    def clear(self) -> None:
        self._free = {}


class Snapshot:
    """Deep copies of state objects whose tensors live in staging buffers: every storage is copied
    once (views and shared storages stay shared, as torch.save writes them), nn.Parameter stays a
    Parameter, containers are rebuilt, other objects are deep-copied (so nothing the training thread
    mutates later reaches the file)."""

    def __init__(self, pool: StagingPool) -> None:
        self.pool = pool
        self.staging: List[torch.UntypedStorage] = []
        self._storages: Dict[int, torch.UntypedStorage] = {}
        self._memo: Dict[int, Any] = {}
        self._device_copies = False

    def take(self, obj: Any) -> Any:
        """A copy of `obj` (one file's state). Sharing is tracked within one call only: the memos are
        keyed by id() and storage address, which objects freed after an earlier call may reuse."""
        self._storages, self._memo = {}, {}
        out = self._copy(obj)
        if self._device_copies and torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking device-to-host copies have landed
        return out

    def _copy(self, obj: Any) -> Any:
        if isinstance(obj, _ATOMIC):
            return obj
        key = id(obj)
        if key in self._memo:
            return self._memo[key]
        if isinstance(obj, torch.Tensor):
            out = self._tensor(obj)
        elif isinstance(obj, dict):
            out = copy.copy(obj)  # the same mapping type (OrderedDict, defaultdict), order kept
            for k, v in obj.items():
                out[k] = self._copy(v)
        elif type(obj) is list:
            out = [self._copy(v) for v in obj]
        elif type(obj) is tuple:
            out = tuple(self._copy(v) for v in obj)
        else:
            out = copy.deepcopy(obj, self._memo)
        self._memo[key] = out
        return out

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        plain = type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided
        if not plain or t.is_quantized or t.device.type == "meta":
            return copy.deepcopy(t.detach(), self._memo)  # rare kinds: an ordinary copy
        src = t.untyped_storage()
        staged = self._storages.get(src._cdata)
        if staged is None:
            on_device = src.device.type != "cpu"
            staged = self.pool.take(src.nbytes(), pin=on_device and torch.cuda.is_available())
            staged.copy_(src, non_blocking=on_device)
            self._device_copies |= on_device
            self._storages[src._cdata] = staged
            self.staging.append(staged)
        new = torch.empty((), dtype=t.dtype).set_(staged, t.storage_offset(), t.size(), t.stride())
        if type(t) is torch.nn.Parameter:
            new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
        elif t.requires_grad and t.is_leaf:
            new.requires_grad_(True)
        if t.__dict__:
            new.__dict__.update(t.__dict__)
        return new


@dataclass
class _File:
    path: Path
    obj: Any
    save: Callable[[Any, str], Any]  # the engine's checkpoint-engine save, or torch.save


@dataclass
class _Job:
    step: int
    root: Path
    ckpt: Path
    files: List[_File]
    staging: List[torch.UntypedStorage]
    commit: Optional[Tuple[str, str]]  # rank 0: (trainer_state.json text, config.yaml text)
    keep_last: int
    snapshot_s: float
    started: float = field(default_factory=time.perf_counter)
    failed: bool = False
    error: Optional[BaseException] = None
    thread: Optional[threading.Thread] = None


class AsyncCheckpointWriter:
    """One per run (CheckpointManager owns it): `save` snapshots and starts the background write,
    `wait` joins the pending one and raises its failure on every rank together."""

    def __init__(self, timeout_minutes: float) -> None:
        self.pool = StagingPool()
        self.pending: Optional[_Job] = None
        self._timeout = datetime.timedelta(minutes=timeout_minutes)
        self._group: Any = None
        self._group_made = False

    # ------------------------------------------------------------------ training thread
    def save(self, engine: Any, root: Path, step: int, trainer_state: Dict[str, Any], rank_state: Dict[str, Any],
             config_yaml: str, keep_last: int, shared: Dict[str, Any]) -> Path:
        """Collective, like checkpoint.write_checkpoint: every rank calls it. Waits for the previous
        save first (at most one pending), snapshots this one and returns while it is written.
        `shared`: file name -> state that rank 0 writes for all (the EMA)."""
        self.wait(root)
        t0 = time.perf_counter()
        tag, rank = C.tag_for(step), D.rank()
        ckpt = root / tag
        if rank == 0 and ckpt.exists():
            shutil.rmtree(ckpt)  # a leftover partial save of the same step
        self._writer_group()  # collective, the first time only
        D.barrier()
        snap = Snapshot(self.pool)
        files: List[_File] = []
        err: Optional[BaseException] = None
        with self._capture(engine, snap, files), C._GuardedWrites(engine) as guard:
            engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        err = guard.error
        if err is None:
            try:
                files.append(_File(ckpt / f"rank_{rank:05d}.pt", snap.take({"rng": C.rng_state(), **rank_state}),
                                   torch.save))
                if rank == 0:
                    files.extend(_File(ckpt / name, snap.take(obj), torch.save) for name, obj in shared.items())
            except (OSError, RuntimeError) as e:  # out of memory for the snapshot: stop as a failed write
                err = e
        self.pool.clear()  # buffers this snapshot did not reuse (the model changed shape): freed now
        C._stop_together_if_failed(root, ckpt, step, err)  # a barrier: every rank holds its snapshot
        commit = (json.dumps(trainer_state, indent=1), config_yaml) if rank == 0 else None
        job = _Job(step, root, ckpt, files, snap.staging, commit, keep_last, time.perf_counter() - t0)
        job.thread = threading.Thread(target=self._write, args=(job,), name=f"ckpt-writer-{tag}", daemon=True)
        self.pending = job
        job.thread.start()
        if rank == 0:
            log.info("checkpoint %s: snapshot taken in %.2f s; written in the background", ckpt, job.snapshot_s)
        return ckpt

    def wait(self, root: Optional[Path] = None, raise_errors: bool = True) -> None:
        """Join the pending save. Its outcome is agreed by the ranks' writers, so every rank raises
        the same CheckpointWriteError together (the partial directory is removed already)."""
        job, self.pending = self.pending, None
        if job is None:
            return
        job.thread.join()
        self.pool.give_back(job.staging)
        if job.failed and raise_errors:
            exc = C._write_error_message(root or job.root, job.step, job.error)
            log.error("%s", exc)
            raise exc
        if job.failed:
            log.error("background checkpoint write of step %d failed: %s", job.step, job.error)

    def close(self) -> None:
        """Wait for the pending write (a failure is logged) and free the staging buffers."""
        self.wait(raise_errors=False)
        self.pool.clear()

    @contextmanager
    def _capture(self, engine: Any, snap: Snapshot, files: List[_File]) -> Iterator[None]:
        """While active, the DeepSpeed checkpoint engine's `save(state, path)` snapshots instead of
        writing; the writer calls the engine's own save with the snapshot later."""
        ce = engine.checkpoint_engine
        orig, had_own = ce.save, "save" in vars(ce)

        def capture(state_dict: Any, path: str) -> None:
            files.append(_File(Path(path), snap.take(state_dict), orig))

        ce.save = capture
        try:
            yield
        finally:
            if had_own:
                ce.save = orig
            else:
                del ce.save

    def _writer_group(self) -> Any:
        """A gloo group of its own for the writers' agreement: collectives from the writer threads
        must never interleave with the training thread's on the default group."""
        if not self._group_made:
            self._group_made = True
            if D.world_size() > 1:
                self._group = torch.distributed.new_group(backend="gloo", timeout=self._timeout)
        return self._group

    # ------------------------------------------------------------------ writer thread
    def _any(self, flag: bool) -> bool:
        if self._group is None:
            return flag
        t = torch.tensor([float(flag)])
        torch.distributed.all_reduce(t, group=self._group)
        return bool(t.item() > 0)

    def _write(self, job: _Job) -> None:
        rank = D.rank()
        err: Optional[BaseException] = None
        try:
            for f in job.files:
                faults.point("checkpoint.async_write", step=job.step, rank=rank, path=str(f.path))
                f.save(f.obj, str(f.path))
        except Exception as e:  # noqa: BLE001 - every rank must still reach the agreement below
            err = e
        job.files = []  # the snapshot's tensors; their buffers go back to the pool on wait()
        try:
            faults.point("checkpoint.rank_files_written", step=job.step, rank=rank)
            failed = self._any(err is not None)  # every rank's files are on disk, or not
            if not failed and job.commit is not None:
                try:
                    C.commit_checkpoint(job.root, job.ckpt, job.step, *job.commit)
                except OSError as e:
                    err = e
            failed = self._any(err is not None) or failed
            if failed:
                if rank == 0:
                    C.remove_partial(job.ckpt)
                self._any(False)  # the partial directory is gone before any rank reports
            elif rank == 0:
                C.retain(job.root, job.step, job.keep_last)
                size = sum(f.stat().st_size for f in job.ckpt.rglob("*") if f.is_file())
                log.info("saved checkpoint %s (%.1f MiB; snapshot %.2f s, written in the background in %.2f s)",
                         job.ckpt, size / 2**20, job.snapshot_s, time.perf_counter() - job.started)
        except Exception as e:  # noqa: BLE001 - a peer is gone: the training thread finds out on its own
            failed, err = True, err or e
        if err is not None:
            log.error("rank %d could not write its part of %s: %s: %s", rank, job.ckpt, type(err).__name__, err)
        job.failed, job.error = failed, err
