"""Test-side hooks for the run lifecycle tests (tests/test_lifecycle.py), enabled in training
subprocesses through `run.plugins=[tests.lifecyclekit:NAME]` with their settings in variables."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from mmpretrain import faults

HANG_VAR = "LIFECYCLE_HANG"  # "STEP:RANK": that rank (-1: every rank) sleeps at the top of that step
STARTUP_DIR_VAR = "LIFECYCLE_STARTUP_DIR"  # each rank writes startup_rank{r} (its pid) there, then sleeps
STARTUP_SLEEP_VAR = "LIFECYCLE_STARTUP_SLEEP"


def plugin(name: str) -> str:
    return f"run.plugins=[tests.lifecyclekit:{name}]"


def hang() -> None:
    at_step, at_rank = (int(x) for x in os.environ[HANG_VAR].split(":"))

    def hook(step: int, rank: int) -> None:
        if step == at_step and at_rank in (rank, -1):
            time.sleep(3600)

    faults.register("train.step_start", hook)


def startup_pause() -> None:
    where = Path(os.environ[STARTUP_DIR_VAR])
    pause = float(os.environ.get(STARTUP_SLEEP_VAR, "5"))

    def hook(rank: int) -> None:
        (where / f"startup_rank{rank}").write_text(str(os.getpid()))
        time.sleep(pause)

    faults.register("train.startup", hook)


def term_in_teardown() -> None:
    def hook(rank: int) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)

    faults.register("train.teardown", hook)
