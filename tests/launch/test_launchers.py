"""One 2-process CPU job started by launch/torchrun.sh, launch/deepspeed.sh and
launch/accelerate.sh: every launcher must give bit-identical losses and final weights."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainkit import REPO, TINY_CONFIG, free_port, tiny_overrides

STEPS = 10
LAUNCHERS = ("torchrun", "deepspeed", "accelerate")


def _start(launcher: str, data: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               NPROC_PER_NODE="2", NUM_GPUS="2", MASTER_PORT=str(free_port()))
    env.pop("MASTER_ADDR", None)
    cmd = ["bash", str(REPO / "launch" / f"{launcher}.sh"), "--config", str(TINY_CONFIG),
           *tiny_overrides(out, data), f"train.steps={STEPS}", "train.save_every=5", "train.log_every=1"]
    log = open(out.parent / f"{launcher}.log", "w")
    (out.parent / f"{launcher}.port").write_text(env["MASTER_PORT"])
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _launch_all(data: Path, outs: dict) -> dict:
    """The three jobs side by side (each on its own free port): the results must not depend on the
    timing, and their start-ups overlap. -> launcher -> seconds until it exited."""
    t0 = time.perf_counter()
    procs = {name: _start(name, data, out) for name, out in outs.items()}
    took = {}
    try:
        for name, p in procs.items():
            rc = p.wait(timeout=max(1.0, 400 - (time.perf_counter() - t0)))
            took[name] = time.perf_counter() - t0
            log = (outs[name].parent / f"{name}.log").read_text()
            assert rc == 0, f"{name} failed ({rc}):\n{log[-5000:]}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return took


def _losses(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("kind", "train") == "train"}


def _weights(out: Path, step: int) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # the fp32 master weights, gathered from both ranks' ZeRO partitions
    return get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=f"step_{step:08d}")


@pytest.mark.distributed
def test_torchrun_deepspeed_accelerate_give_identical_training(tiny_data, tmp_path):
    outs = {name: tmp_path / name for name in LAUNCHERS}
    took = _launch_all(tiny_data, outs)
    print("done after (s):", {k: round(v, 1) for k, v in took.items()})

    for name, out in outs.items():  # each launcher really ran 2 ranks and was recognised
        log0 = (out / "logs" / "rank0.log").read_text()
        assert f"launcher={name} rank=0/2" in log0, log0[:2000]
        assert (out / "logs" / "rank1.log").exists()
        assert (out / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").exists()

    # DeepSpeed's CPU comm op maps a 67 MB /dev/shm buffer per rank and never unlinks it: the trainer
    # does, once every rank has mapped its peers' (mmpretrain.distributed._unlink_shm_buffers)
    leaked = [p.name for name, out in outs.items() for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")
              if p.name.split("_")[-2] == (out.parent / f"{name}.port").read_text()]
    assert not leaked, leaked

    losses = {name: _losses(out) for name, out in outs.items()}
    assert sorted(losses["torchrun"]) == list(range(1, STEPS + 1))
    assert losses["deepspeed"] == losses["torchrun"]
    assert losses["accelerate"] == losses["torchrun"]

    ref = _weights(outs["torchrun"], STEPS)
    assert ref, "no parameters reconstructed"
    for name in ("deepspeed", "accelerate"):
        other = _weights(outs[name], STEPS)
        assert other.keys() == ref.keys()
        diff = [k for k in ref if not torch.equal(ref[k], other[k])]
        assert not diff, f"{name}: parameters differ from torchrun's: {diff[:5]}"
    # and training did move the weights between the two checkpoints
    mid = _weights(outs["torchrun"], 5)
    assert any(not torch.equal(mid[k], ref[k]) for k in ref)
