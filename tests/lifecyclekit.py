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


SLOW_AFTER_VAR = "LIFECYCLE_SLOW_AFTER"  # "STEP:SECONDS": in a job's first run only, sleep before each later step


def slow_first_run() -> None:
    """Keep a SLURM job's first run slow after a few steps, so a test's signal always lands mid-run
    while the requeued run goes at full speed (the test stays short and cannot race the end)."""
    after, pause = os.environ[SLOW_AFTER_VAR].split(":")
    if os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
        return

    def hook(step: int, rank: int) -> None:
        if step > int(after):
            time.sleep(float(pause))

    faults.register("train.step_start", hook)


HOLD_VAR = "LIFECYCLE_HOLD"  # "STEP:PATH": from that step on, every rank waits at the top of a step while PATH exists


def hold_while_file() -> None:
    """Hold every rank at the top of step STEP (and later ones) while a file exists: runs started at
    different times all stand mid-run, with the same complete checkpoint, until the test removes it."""
    at_step, path = os.environ[HOLD_VAR].split(":", 1)

    def hook(step: int, rank: int) -> None:
        while step >= int(at_step) and os.path.exists(path):
            time.sleep(0.1)

    faults.register("train.step_start", hook)


MODULES_OUT_VAR = "LIFECYCLE_MODULES_OUT"  # a file: the heavy modules this rank had imported at teardown


def record_modules() -> None:
    import json
    import sys

    def hook(rank: int) -> None:
        names = ("torch._inductor.compile_fx", "deepspeed.runtime.zero.muon.original_muon")
        Path(os.environ[MODULES_OUT_VAR]).write_text(json.dumps(
            {n: getattr(sys.modules.get(n), "__file__", None) is not None for n in names}))

    faults.register("train.teardown", hook)
