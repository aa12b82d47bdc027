"""Run lifecycle guards (issue 13): ranks die with their launcher, one writer per run directory,
a lost peer ends the run with a distinct exit code naming the rank, and a watchdog dumps every
thread's stack when no step completes in time.

Nothing here imports torch at module level: `PARENT_AT_IMPORT` is taken as early as possible."""
from __future__ import annotations

import ctypes
import faulthandler
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

log = logging.getLogger("mmpretrain.lifecycle")

# EX_PROTOCOL from sysexits.h ("remote error in protocol"): a peer rank vanished or stopped
# answering within train.dist_timeout_minutes. Batch scripts may requeue on it (the run resumes
# from its last checkpoint); the SLURM templates requeue on it as on REQUEUE_EXIT_CODE (75).
PEER_LOST_EXIT_CODE = 76
# no step completed within train.hang_timeout_minutes; stacks are in logs/hang_rank{r}.txt
HANG_EXIT_CODE = 79
LOCK_NAME = "run.lock"
PARENT_AT_IMPORT = os.getppid()
_PR_SET_PDEATHSIG = 1
HEARTBEAT_S = 1.0


# ----------------------------------------------------------------------------- parent death
def die_with_parent(expected_parent: int = PARENT_AT_IMPORT) -> bool:
    """Linux: ask for SIGKILL when the launcher that started this rank dies (PR_SET_PDEATHSIG);
    if it died already (we were re-parented before the request), die now. Returns whether the
    kernel request succeeded (the watchdog also polls the parent as a fallback)."""
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            ok = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            ok = False
    if os.getppid() != expected_parent:  # the launcher is gone already: the race the request cannot cover
        print(f"error: the launcher (pid {expected_parent}) is gone; exiting", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return ok


# ----------------------------------------------------------------------------- run directory lock
class RunDirBusy(RuntimeError):
    """Another live run holds the run directory; the message names the holder."""


def _proc_start(pid: int) -> Optional[str]:
    """The start time of `pid` in clock ticks since boot (/proc), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`run.lock` in the run directory: host, pid, SLURM job id, start time of the run that writes
    there. Taken by rank 0 before anything is written; a second run refuses, unless the holder is
    provably gone (same host and its pid dead or reused; or the same SLURM job at a lower restart
    count, i.e. a requeue), which it then takes over. Released at exit."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.held = False
        self.took_over: Optional[Dict[str, Any]] = None

    @staticmethod
    def me() -> Dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _read(self) -> Optional[Dict[str, Any]]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None

    @staticmethod
    def _gone(h: Dict[str, Any]) -> Optional[str]:
        """Why the holder is provably gone, or None when it may be alive."""
        me = RunLock.me()
        if h.get("host") == me["host"] and isinstance(h.get("pid"), int):
            if not _pid_alive(h["pid"]):
                return f"pid {h['pid']} is not running on {me['host']}"
            start = _proc_start(h["pid"])
            if h.get("proc_start") and start and start != h["proc_start"]:
                return f"pid {h['pid']} on {me['host']} is another process now"
        if h.get("slurm_job_id") and h.get("slurm_job_id") == me["slurm_job_id"]:
            try:
                if int(h.get("slurm_restart_count") or 0) < int(me["slurm_restart_count"] or 0):
                    return f"SLURM job {h['slurm_job_id']} was requeued since"
            except ValueError:
                pass
        return None

    @staticmethod
    def describe(h: Dict[str, Any]) -> str:
        job = f", SLURM job {h['slurm_job_id']}" if h.get("slurm_job_id") else ""
        return f"pid {h.get('pid')} on host {h.get('host')}{job}, started {h.get('started')}"

    def acquire(self) -> None:
        """Take the lock or raise RunDirBusy naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = self.me()
        tmp = self.path.with_name(f"{LOCK_NAME}.{me['host']}.{me['pid']}.tmp")
        tmp.write_text(json.dumps(me) + "\n")
        try:
            for _ in range(5):
                try:
                    os.link(tmp, self.path)  # atomic, fails when it exists, and the content is complete
                    self.held = True
                    atexit_release(self)
                    return
                except FileExistsError:
                    pass
                holder = self._read()
                if holder == {}:
                    continue  # released meanwhile
                if holder is None:
                    raise RunDirBusy(f"run directory {self.path.parent} has an unreadable lock {self.path}; "
                                     "remove it if no run writes there")
                why = self._gone(holder)
                if why is None:
                    raise RunDirBusy(f"run directory {self.path.parent} is in use by {self.describe(holder)} "
                                     f"(lock {self.path}); stop that run or choose another run.output_dir")
                if self._read() != holder:
                    continue  # someone else took it over meanwhile
                stale = self.path.with_name(f"{LOCK_NAME}.stale.{me['pid']}")
                try:
                    os.rename(self.path, stale)
                    stale.unlink()
                except FileNotFoundError:
                    pass
                self.took_over = {**holder, "why": why}
            raise RunDirBusy(f"could not take the lock {self.path} (it keeps changing hands)")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        h = self._read()
        if h and h.get("pid") == os.getpid() and h.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)


_LOCKS: List[RunLock] = []


def atexit_release(lock: RunLock) -> None:
    import atexit

    if not _LOCKS:
        atexit.register(lambda: [lk.release() for lk in list(_LOCKS)])
    _LOCKS.append(lock)


def release_all() -> None:
    for lk in list(_LOCKS):
        lk.release()


# ----------------------------------------------------------------------------- watchdog
class Watchdog:
    """One daemon thread per rank: a heartbeat in the process group's store (so the survivors can
    name a lost rank), a parent watch (fallback for PR_SET_PDEATHSIG), and the hang check: with
    no `beat()` within `hang_timeout_s` (0 = off) every thread's stack goes to
    `logs/hang_rank{r}.txt` and the process exits with HANG_EXIT_CODE."""

    def __init__(self, rank: int, world: int, log_dir: Path, hang_timeout_s: float = 0.0,
                 parent: Optional[int] = None) -> None:
        self.rank, self.world, self.log_dir = rank, world, Path(log_dir)
        self.hang_timeout_s = hang_timeout_s
        self.parent = parent
        self.last = time.monotonic()
        self.armed = False
        self._stop = threading.Event()
        self._store = None
        self._count = 0
        self._thread = threading.Thread(target=self._loop, name="mmpretrain-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        if self.world > 1:
            try:
                from torch.distributed import distributed_c10d

                self._store = distributed_c10d._get_default_store()
            except Exception:  # noqa: BLE001 - no heartbeat then, the rest still works
                self._store = None
        self._thread.start()
        return self

    def beat(self) -> None:
        """A step (or an eval, a save) completed: progress."""
        self.last = time.monotonic()

    def arm(self) -> None:
        self.last = time.monotonic()
        self.armed = self.hang_timeout_s > 0

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self._next_wait()):
            if self.parent is not None and os.getppid() != self.parent:
                print(f"error: rank {self.rank}: the launcher (pid {self.parent}) is gone; exiting",
                      file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if self._store is not None:
                self._count += 1
                try:
                    self._store.set(f"mmpretrain/heartbeat/{self.rank}", str(self._count))
                except Exception:  # noqa: BLE001 - the store's host may be gone; the main thread will notice
                    pass
            if self.armed and time.monotonic() - self.last > self.hang_timeout_s:
                self._hang()

    def _next_wait(self) -> float:
        """Wake at the heartbeat period, or exactly at the hang deadline (so ranks whose last step
        ended together fire together, before a launcher tears the slower ones down)."""
        if not self.armed:
            return HEARTBEAT_S
        return max(0.01, min(HEARTBEAT_S, self.last + self.hang_timeout_s - time.monotonic() + 0.005))

    def _hang(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"hang_rank{self.rank}.txt"
        waited = time.monotonic() - self.last
        with open(path, "w") as f:
            f.write(f"rank {self.rank}: no step completed in {waited:.1f} s "
                    f"(train.hang_timeout_minutes={self.hang_timeout_s / 60:g}); stacks of every thread:\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        msg = (f"rank {self.rank}: no step completed in {waited:.0f} s (train.hang_timeout_minutes="
               f"{self.hang_timeout_s / 60:g}); stacks in {path} (every rank: {self.log_dir}/hang_rank*.txt); "
               f"exiting with {HANG_EXIT_CODE}")
        log.error("%s", msg)
        print(f"error: {msg}", file=sys.stderr, flush=True)
        for h in logging.getLogger("mmpretrain").handlers:
            try:
                h.flush()
            except Exception:  # noqa: BLE001
                pass
        release_all()
        os._exit(HANG_EXIT_CODE)

    def lost_ranks(self, wait_s: float = 3 * HEARTBEAT_S) -> Optional[List[int]]:
        """Ranks whose heartbeat stopped (compared over `wait_s`); None when the store is unreachable."""
        if self._store is None:
            return []
        keys = [f"mmpretrain/heartbeat/{r}" for r in range(self.world)]

        def read() -> List[Optional[bytes]]:
            out: List[Optional[bytes]] = []
            for k in keys:
                out.append(self._store.get(k) if self._store.check([k]) else None)
            return out

        try:
            before = read()
            time.sleep(wait_s)
            after = read()
        except Exception:  # noqa: BLE001 - the store's host (rank 0 or the launcher) is gone
            return None
        return [r for r in range(self.world) if r != self.rank and before[r] == after[r]]


_PEER_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
                 "timeout", "socket", "nccl", "gloo", "processgroup", "process group", "recv", "send")


def looks_like_peer_loss(e: BaseException) -> bool:
    """A collective failure (a peer gone, a timeout) rather than a bug of this rank."""
    try:
        import torch.distributed as dist

        if isinstance(e, getattr(dist, "DistError", ())):
            return True
    except ImportError:
        pass
    text = f"{type(e).__name__}: {e}".lower()
    return isinstance(e, RuntimeError) and any(m in text for m in _PEER_MARKERS)
