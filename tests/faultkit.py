"""Test-side fault hooks (mmpretrain.faults). Training subprocesses enable them through the
config, `run.plugins=[tests.faultkit:kill_in_save]` (the repository is on the children's
PYTHONPATH, see trainkit.env), with the steps in a variable this module reads:

    tk.run(..., [*over, faultkit.plugin("kill_in_save")], log, **{faultkit.KILL_IN_SAVE_VAR: "6"})

In-process tests use the context managers (`io_counters`)."""
from __future__ import annotations

import os
import signal
from contextlib import ExitStack, contextmanager
from typing import Dict, Iterator, Set

from mmpretrain import faults

KILL_IN_SAVE_VAR = "FAULTKIT_KILL_IN_SAVE"
NAN_IMAGE_VAR = "FAULTKIT_NAN_IMAGE"


def plugin(name: str) -> str:
    """The override that enables hook function `name` of this module in a training run."""
    return f"run.plugins=[tests.faultkit:{name}]"


def _steps(var: str) -> Set[int]:
    raw = os.environ.get(var)
    if raw is None:
        raise RuntimeError(f"faultkit: the hook needs its steps in {var} (e.g. {var}=3,4)")
    return {int(x) for x in raw.split(",") if x.strip()}


def kill_in_save() -> None:
    """SIGKILL every rank after it wrote its checkpoint files at the steps in FAULTKIT_KILL_IN_SAVE,
    before the save is committed (no COMPLETE marker, no `latest`)."""
    steps = _steps(KILL_IN_SAVE_VAR)

    def hook(step: int, rank: int) -> None:
        if step in steps:
            os.kill(os.getpid(), signal.SIGKILL)

    faults.register("checkpoint.rank_files_written", hook)


def poison_image(batch, value: float = float("nan")) -> None:
    """Set the first image of a batch (typed Batch with `.inputs`, or a dict) to `value`. The pipeline's
    images are uint8 levels, which hold no NaN: they become the model's float input first (CLIP's
    normalisation, as the model would do it), which the model takes as it is."""
    from mmpretrain import modalities as M
    from mmpretrain.config import DataConfig

    holder = batch.inputs if hasattr(batch, "inputs") else batch
    if not holder["image"].is_floating_point():
        holder["image"] = M.to_model_input(M.get("image"), holder["image"], DataConfig())
    holder["image"][0] = value


def nan_image() -> None:
    """One NaN image on rank 0 in the batches of the steps in FAULTKIT_NAN_IMAGE."""
    steps = _steps(NAN_IMAGE_VAR)

    def hook(step: int, batch, rank: int) -> None:
        if step in steps and rank == 0:
            poison_image(batch)

    faults.register("train.batch", hook)


SLOW_STEP_VAR = "FAULTKIT_SLOW_STEP"


def slow_steps() -> None:
    """Every training step sleeps FAULTKIT_SLOW_STEP seconds first (a slow device: train.max_minutes tests)."""
    import time

    seconds = float(os.environ[SLOW_STEP_VAR])

    def hook(step: int, rank: int) -> None:
        time.sleep(seconds)

    faults.register("train.step_start", hook)


def no_audio_on_rank1() -> None:
    """Rank 1's batches have no audio at all (every audio mask cleared): a rank with an empty modality."""

    def hook(step: int, batch, rank: int) -> None:
        if rank == 1:
            batch.masks["audio"][:] = False

    faults.register("train.batch", hook)


@contextmanager
def io_counters() -> Iterator[Dict[str, int]]:
    """Counts shard I/O of this process inside the block: opens, samples read, bytes read."""
    counts = {"opens": 0, "samples": 0, "bytes": 0}

    def opened(url: str) -> None:
        counts["opens"] += 1

    def sample(url: str) -> None:
        counts["samples"] += 1

    def read(url: str, n: int) -> None:
        counts["bytes"] += n

    with ExitStack() as stack:
        stack.enter_context(faults.hooked("shards.open", opened))
        stack.enter_context(faults.hooked("shards.sample_read", sample))
        stack.enter_context(faults.hooked("shards.bytes_read", read))
        yield counts


SLOW_WRITE_VAR = "FAULTKIT_SLOW_WRITE"  # seconds before each file of a background (train.async_save) write
WRITE_LOG_VAR = "FAULTKIT_WRITE_LOG"  # optional: a file that gets "step rank time path" per background file


def slow_async_writes() -> None:
    """train.async_save's background writer sleeps FAULTKIT_SLOW_WRITE seconds before each file (a slow
    disk) and notes each file in FAULTKIT_WRITE_LOG: kill trials aim at a write in progress."""
    import time

    seconds = float(os.environ[SLOW_WRITE_VAR])
    note = os.environ.get(WRITE_LOG_VAR)

    def hook(step: int, rank: int, path: str) -> None:
        if note:
            with open(note, "a") as f:
                f.write(f"{step} {rank} {time.time():.3f} {os.path.basename(path)}\n")
        time.sleep(seconds)

    faults.register("checkpoint.async_write", hook)
