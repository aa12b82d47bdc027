"""Preemption: SIGTERM / SIGUSR1 (or a SLURM time limit drawing near) set a flag; the ranks
agree on it at the next step boundary, save together and exit with REQUEUE_EXIT_CODE, which
launchers and the SLURM batch script turn into a requeue."""
from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple

log = logging.getLogger("mmpretrain.preemption")

# EX_TEMPFAIL from sysexits.h: "try again later". Distinct from crashes (1), bad config (2)
# and signal deaths (128+N), so a launcher can requeue on exactly this code.
REQUEUE_EXIT_CODE = 75
# torchrun turns any worker failure into its own exit code 1, so rank 0 also leaves this file
# in run.output_dir after the save; batch scripts requeue when it exists (it is removed on start)
PREEMPTED_MARKER = "PREEMPTED"
_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_TIME_LIMIT_CODE = 1000  # the agreement's code for "SLURM time limit near" (signals use their numbers)
_EARLY: Optional["PreemptionWatcher"] = None


def install_early() -> "PreemptionWatcher":
    """Install the flag-only handlers now (idempotent; torch-free, so an entry point can call it
    before its heavy imports): a USR1/TERM during start-up is then recorded, not fatal. The
    trainer picks up the same watcher (`install_early()` again) and sets its time-limit margin."""
    global _EARLY
    if _EARLY is None:
        _EARLY = PreemptionWatcher().install()
    return _EARLY


class PreemptionWatcher:
    """Installs handlers that only set a flag (saving inside a handler is not safe)."""

    def __init__(self, time_limit_margin_s: float = 0.0) -> None:
        self.flag: Optional[str] = None
        self._prev: Dict[int, object] = {}
        self.deadline: Optional[float] = None
        # after agreement: the reason and the lowest rank that had it (every rank knows both)
        self.source: Optional[Tuple[str, int]] = None
        self.set_margin(time_limit_margin_s)

    def set_margin(self, time_limit_margin_s: float) -> None:
        self.deadline = None
        end = os.environ.get("SLURM_JOB_END_TIME")  # epoch seconds, set by SLURM >= 21.08
        if end and time_limit_margin_s > 0:
            try:
                self.deadline = float(end) - time_limit_margin_s
            except ValueError:
                self.deadline = None

    def install(self) -> "PreemptionWatcher":
        for sig in _SIGNALS:
            prev = signal.signal(sig, self._handle)
            self._prev.setdefault(sig, prev)
        return self

    def ignore_from_now(self) -> None:
        """The exit code is decided: a TERM/USR1 from now on (a launcher tearing the ranks down,
        a late preemption) must not turn it into a signal death, even during interpreter teardown."""
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def uninstall(self) -> None:
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)
        self._prev.clear()

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001
        if self.flag is None:
            self.flag = signal.Signals(signum).name

    def local_reason(self) -> Optional[str]:
        if self.flag is None and self.deadline is not None and time.time() >= self.deadline:
            self.flag = "time_limit"
        return self.flag

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank was signalled; then `source` holds the
        reason (signal name or time_limit) and the lowest rank that had it, the same on every rank."""
        import torch

        from mmpretrain import distributed as D

        reason = self.local_reason()
        code = 0 if reason is None else (_TIME_LIMIT_CODE if reason == "time_limit" else int(signal.Signals[reason]))
        codes = D.all_gather_nograd(torch.tensor([code], dtype=torch.int64)).tolist()
        for r, c in enumerate(codes):
            if c:
                self.source = ("time_limit" if c == _TIME_LIMIT_CODE else signal.Signals(c).name, r)
                return True
        return False

    def describe(self) -> str:
        """`SIGUSR1 on rank 1`, for logs and the PREEMPTED marker."""
        if self.source is None:
            return str(self.flag)
        return f"{self.source[0]} on rank {self.source[1]}"


@contextmanager
def exit_on_signal_while_blocked(what: str) -> Iterator[None]:
    """A USR1/TERM during this block ends the process at once with REQUEUE_EXIT_CODE.

    For a blocking call in C (the rendezvous: a rank waits on a peer or a port that never
    answers) Python's handlers only run once the call returns, so a launcher tearing its ranks
    down (SIGTERM, then SIGKILL 30 s later) or a preemption waited for the whole timeout. The
    interpreter writes each caught signal to a wakeup fd even then; a thread reads it. A signal
    recorded earlier in start-up (install_early) counts as one in the block: the launcher that sent
    it may have torn the peers down already, so the rendezvous may never return. Nothing is trained
    yet and the ranks cannot agree, so no save and no marker: the exit code says it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set the wakeup fd
        return
    pending = _EARLY.flag if _EARLY is not None else None
    if pending in {s.name for s in _SIGNALS}:  # exit before blocking
        sys.stderr.write(f"mmpretrain: {pending} during start-up, before {what}: exiting with code "
                         f"{REQUEUE_EXIT_CODE} for requeue (nothing to save)\n")
        sys.stderr.flush()
        os._exit(REQUEUE_EXIT_CODE)
    r, w = os.pipe()
    os.set_blocking(w, False)
    prev = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    done = threading.Event()
    wanted = {int(s) for s in _SIGNALS}

    def watch() -> None:
        while not done.is_set():
            if not select.select([r], [], [], 0.2)[0]:
                continue
            for signum in os.read(r, 64):
                if signum in wanted and not done.is_set():
                    sys.stderr.write(f"mmpretrain: {signal.Signals(signum).name} during {what}, before any step: "
                                     f"exiting with code {REQUEUE_EXIT_CODE} for requeue (nothing to save)\n")
                    sys.stderr.flush()
                    os._exit(REQUEUE_EXIT_CODE)

    thread = threading.Thread(target=watch, name="mmpretrain-rendezvous-signals", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(prev)
        thread.join()
        os.close(r)
        os.close(w)
