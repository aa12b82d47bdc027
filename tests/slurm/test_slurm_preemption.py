"""The preemption loop on a real SLURM, once per launcher (srun, torchrun; both jobs at once): a
tiny 2-process training job submitted with mmpretrain-submit gets USR1 mid-run (`scancel
--signal=USR1 --batch`), saves, exits for requeue, the batch script requeues it, and the second
run resumes from that checkpoint and finishes."""
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


LAUNCHERS = ("srun", "torchrun")


class Job:
    """One submitted job of the test: its launcher, run directory and SLURM id."""

    def __init__(self, launcher: str, root: Path, env: Dict[str, str]) -> None:
        self.launcher, self.env, self.run_dir = launcher, env, root / launcher
        data = tk.make_tiny_data(root / "data")
        procs = ["--cpus-per-task", "1"] if launcher == "srun" else ["--cpus-per-task", "2"]
        sub = _run([sys.executable, "-m", "mmpretrain.submit", "--config", str(tk.TINY_CONFIG), "--launcher", launcher,
                    "--gpus-per-node", "0", "--procs-per-node", "2", *procs, "--time", "15", "--signal-seconds", "120",
                    "--workdir", str(tk.REPO), *tk.tiny_overrides(self.run_dir, data), f"train.steps={STEPS}",
                    "train.log_every=1", "train.save_every=0", lk.plugin("slow_first_run")], env, cwd=tk.REPO)
        assert sub.returncode == 0, f"[{launcher}] {sub.stderr}"
        self.id = (self.run_dir / "slurm_jobs.txt").read_text().split("\t")[0]
        assert self.id.isdigit() and f"submitted job {self.id}" in sub.stdout
        self.out_file = self.run_dir / "slurm" / f"tiny-{self.id}.out"

    def diag(self) -> str:
        log = self.out_file.read_text()[-6000:] if self.out_file.exists() else "(no job output)"
        return f"[{self.launcher}] scontrol: {_job_fields(self.id, self.env)}\n--- {self.out_file}\n{log}"

    def logged_steps(self) -> int:
        return sum(r.get("kind") == "train" for r in tk.metrics_rows(self.run_dir))

    def done(self) -> bool:
        return _job_fields(self.id, self.env).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


@pytest.mark.slurm
def test_usr1_saves_requeues_and_resumes(slurm_cluster, tmp_path):
    """Both launchers' jobs run side by side (the test cluster declares 4 CPUs, so the two 2-CPU jobs
    run at once): the preemption loop is the same, and the waits for SLURM overlap."""
    t0 = time.time()
    env = dict(os.environ, **slurm_cluster, OMP_NUM_THREADS="1", **{lk.SLOW_AFTER_VAR: f"{SLOW_AFTER}:0.5"})
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    for k in [k for k in env if k.startswith(("SLURM_JOB", "SLURM_STEP", "SLURM_PROCID", "RANK", "WORLD_SIZE"))]:
        env.pop(k)  # pytest itself may run inside a job
    jobs = [Job(launcher, tmp_path, env) for launcher in LAUNCHERS]
    t_signal = {}
    try:
        pending = list(jobs)
        while pending:  # signal each job once it has logged SIGNAL_AFTER_STEP steps (its first run is slow from there)
            for job in list(pending):
                if job.logged_steps() >= SIGNAL_AFTER_STEP:
                    sig = _run(["scancel", "--signal=USR1", "--batch", job.id], env)
                    assert sig.returncode == 0, sig.stderr
                    t_signal[job.launcher] = time.time()
                    pending.remove(job)
            time.sleep(0.25)
            if time.time() - t0 > 240:
                pytest.fail("timed out waiting for logged steps\n" + "\n".join(j.diag() for j in pending))
        for job in jobs:
            _wait(job.done, JOB_TIMEOUT_S, f"the {job.launcher} job to finish", job.diag)
    finally:
        for job in jobs:
            _run(["scancel", job.id], env)  # no-op when finished
    for job in jobs:
        _check_job(job)
        print(f"\n[{job.launcher}] signal->done {time.time() - t_signal[job.launcher]:.1f} s (or less); "
              f"total {time.time() - t0:.1f} s")


def _check_job(job: Job) -> None:
    fields, diag, run_dir = _job_fields(job.id, job.env), job.diag, job.run_dir
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", diag()
    assert fields.get("Restarts") == "1", diag()
    log = job.out_file.read_text()
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log, log[-4000:]
    assert "caught SIGUSR1" in log and f"requeueing job {job.id}" in log, log[-4000:]

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
    assert steps == list(range(1, STEPS + 1)), (job.launcher, step, steps[:5], len(steps))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert not (run_dir / "PREEMPTED").exists()
