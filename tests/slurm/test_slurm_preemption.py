"""The preemption loop on a real SLURM: a tiny 2-process training job submitted with
mmpretrain-submit gets USR1 mid-run (`scancel --signal=USR1 --batch`), saves, exits for requeue,
the batch script requeues it, and the second run resumes from that checkpoint and finishes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

import lifecyclekit as lk
import trainkit as tk

STEPS = 40
SIGNAL_AFTER_STEP = 3  # signal once this many steps are logged
# the first run sleeps 0.5 s before each step after this one, so the signal lands mid-run however
# loaded the machine; the requeued run trains the rest at full speed
SLOW_AFTER = SIGNAL_AFTER_STEP
JOB_TIMEOUT_S = 300


def _run(cmd: List[str], env: Dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, **kw)


def _job_fields(job_id: str, env: Dict[str, str]) -> Dict[str, str]:
    out = _run(["scontrol", "show", "job", job_id], env).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def _wait(cond, timeout: float, what: str, diag) -> None:
    end = time.time() + timeout
    while not cond():
        if time.time() > end:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{diag()}")
        time.sleep(0.25)


@pytest.mark.slurm
@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_usr1_saves_requeues_and_resumes(slurm_cluster, tmp_path, launcher):
    t0 = time.time()
    env = dict(os.environ, **slurm_cluster, OMP_NUM_THREADS="1", **{lk.SLOW_AFTER_VAR: f"{SLOW_AFTER}:0.5"})
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    for k in [k for k in env if k.startswith(("SLURM_JOB", "SLURM_STEP", "SLURM_PROCID", "RANK", "WORLD_SIZE"))]:
        env.pop(k)  # pytest itself may run inside a job
    data = tk.make_tiny_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    procs = ["--cpus-per-task", "1"] if launcher == "srun" else ["--cpus-per-task", "2"]
    sub = _run([sys.executable, "-m", "mmpretrain.submit", "--config", str(tk.TINY_CONFIG), "--launcher", launcher,
                "--gpus-per-node", "0", "--procs-per-node", "2", *procs, "--time", "15", "--signal-seconds", "120",
                "--workdir", str(tk.REPO), *tk.tiny_overrides(run_dir, data), f"train.steps={STEPS}", "train.log_every=1",
                "train.save_every=0", lk.plugin("slow_first_run")], env, cwd=tk.REPO)
    assert sub.returncode == 0, sub.stderr
    job_id = (run_dir / "slurm_jobs.txt").read_text().split("\t")[0]
    assert job_id.isdigit() and f"submitted job {job_id}" in sub.stdout
    out_file = run_dir / "slurm" / f"tiny-{job_id}.out"

    def diag() -> str:
        log = out_file.read_text()[-6000:] if out_file.exists() else "(no job output)"
        return f"scontrol: {_job_fields(job_id, env)}\n--- {out_file}\n{log}"

    try:
        def logged_steps() -> bool:
            return sum(r.get("kind") == "train" for r in tk.metrics_rows(run_dir)) >= SIGNAL_AFTER_STEP

        _wait(logged_steps, 180, f"{SIGNAL_AFTER_STEP} logged steps", diag)
        sig = _run(["scancel", "--signal=USR1", "--batch", job_id], env)
        assert sig.returncode == 0, sig.stderr
        t_signal = time.time()
        _wait(lambda: _job_fields(job_id, env).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
              JOB_TIMEOUT_S, "the job to finish", diag)
    finally:
        _run(["scancel", job_id], env)  # no-op when finished

    fields = _job_fields(job_id, env)
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", diag()
    assert fields.get("Restarts") == "1", diag()
    log = out_file.read_text()
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log, log[-4000:]
    assert "caught SIGUSR1" in log and f"requeueing job {job_id}" in log, log[-4000:]

    rows = tk.metrics_rows(run_dir)
    preempted = [r for r in rows if r.get("kind") == "preempted"]
    assert len(preempted) == 1, diag()
    step = preempted[0]["step"]
    assert SIGNAL_AFTER_STEP <= step < STEPS
    # the checkpoint saved on the signal, complete, and the one the second run resumed from
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    assert (ckpt / "COMPLETE").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
    for rank in (0, 1):
        rank_log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"resumed from {ckpt} (step {step})" in rank_log, rank_log[-3000:]
    # every step trained exactly once across the two runs, and the job reached the end
    steps = [r["step"] for r in rows if r.get("kind") == "train"]
    assert steps == list(range(1, STEPS + 1)), (step, steps[:5], len(steps))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert not (run_dir / "PREEMPTED").exists()
    print(f"\n[{launcher}] preempted at step {step}; signal->done {time.time() - t_signal:.1f} s; "
          f"total {time.time() - t0:.1f} s")
