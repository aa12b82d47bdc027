"""Preemption: SIGTERM / SIGUSR1 (or a SLURM time limit drawing near) set a flag; the ranks
agree on it at the next step boundary, save together and exit with REQUEUE_EXIT_CODE, which
launchers and the SLURM batch script turn into a requeue."""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Optional


from mmpretrain import distributed as D

log = logging.getLogger("mmpretrain.preemption")

# EX_TEMPFAIL from sysexits.h: "try again later". Distinct from crashes (1), bad config (2)
# and signal deaths (128+N), so a launcher can requeue on exactly this code.
REQUEUE_EXIT_CODE = 75
# torchrun turns any worker failure into its own exit code 1, so rank 0 also leaves this file
# in run.output_dir after the save; batch scripts requeue when it exists (it is removed on start)
PREEMPTED_MARKER = "PREEMPTED"
_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    """Installs handlers that only set a flag (saving inside a handler is not safe)."""

    def __init__(self, time_limit_margin_s: float = 0.0) -> None:
        self.flag: Optional[str] = None
        self._prev = {}
        self.deadline: Optional[float] = None
        end = os.environ.get("SLURM_JOB_END_TIME")  # epoch seconds, set by SLURM >= 21.08
        if end and time_limit_margin_s > 0:
            try:
                self.deadline = float(end) - time_limit_margin_s
            except ValueError:
                self.deadline = None

    def install(self) -> "PreemptionWatcher":
        for sig in _SIGNALS:
            self._prev[sig] = signal.signal(sig, self._handle)
        return self

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
        """Collective: True on every rank when any rank was signalled."""
        return D.any_rank(bool(self.local_reason()))
