"""The same 2-node x 2-process job on a 2-node cluster made of network namespaces (conftest.py):
torchrun's c10d rendezvous across hosts, the deepspeed launcher with a hostfile through pdsh over
ssh, and SLURM (`mmpretrain-submit --nodes 2`, preempted, requeued, resumed) must give the final
weights of a 1-node 4-process run bit for bit; and a node lost mid-run ends every launcher's ranks on
the surviving node within the collective timeout + 30 s, while the SLURM job requeues and resumes."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

import lifecyclekit as lk
import trainkit as tk

pytestmark = [pytest.mark.multinode, pytest.mark.distributed]

ON_NODE = Path(__file__).resolve().parent / "on_node.sh"
STEPS = 10
DIST_TIMEOUT_MIN = 0.5  # train.dist_timeout_minutes of the node-loss runs: a lost peer ends a rank by then


def _env(cluster: Dict[str, str], **extra: str) -> Dict[str, str]:
    e = tk.env()
    for k in [k for k in e if k.startswith(("SLURM_JOB", "SLURM_STEP", "SLURM_PROCID", "RANK", "WORLD_SIZE",
                                            "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))]:
        e.pop(k)  # pytest itself may run inside a job
    # the cluster's `ssh` (its keys) first, then this environment's tools on every node
    e.update(PATH=f"{cluster['bin']}:{tk.VENV_BIN}:{e['PATH']}", PYTHON=sys.executable,
             SLURM_CONF=cluster["SLURM_CONF"], MMP_MN_DIR=cluster["MMP_MN_DIR"], **extra)
    return e


def _overrides(out: Path, data: Path, *extra: str) -> List[str]:
    return ["--config", str(tk.TINY_CONFIG), *tk.tiny_overrides(out, data), f"train.steps={STEPS}",
            "train.save_every=5", "train.log_every=1", *extra]


def _popen(cmd: List[str], env: Dict[str, str], log: Path) -> subprocess.Popen:
    p = subprocess.Popen(cmd, cwd=tk.REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    p.log_path = log  # type: ignore[attr-defined]
    return p


def on_node(node: str, cmd: List[str]) -> List[str]:
    return [str(ON_NODE), node, *cmd]


def start_torchrun(cluster, out: Path, data: Path, port: int, *extra: str, env_extra=None) -> List[subprocess.Popen]:
    """`launch/torchrun.sh` on each node: c10d rendezvous at node1:port, no node rank given."""
    env = _env(cluster, NNODES="2", NPROC_PER_NODE="2", MASTER_ADDR="node1", MASTER_PORT=str(port),
               RDZV_ID=out.name, **(env_extra or {}))
    cmd = ["bash", str(tk.REPO / "launch" / "torchrun.sh"), *_overrides(out, data, *extra)]
    return [_popen(on_node(n, cmd), env, out.parent / f"{out.name}-{n}.log") for n in ("node1", "node2")]


def start_deepspeed(cluster, out: Path, data: Path, port: int, *extra: str, env_extra=None) -> subprocess.Popen:
    """`launch/deepspeed.sh` on node1 with a hostfile: pdsh ssh-es to both nodes."""
    hostfile = out.parent / f"{out.name}.hostfile"
    hostfile.write_text("node1 slots=2\nnode2 slots=2\n")
    # the launcher forwards a fixed set of variables to the nodes; the test hooks' too (MMP_FORWARD_ENV)
    env = _env(cluster, HOSTFILE=str(hostfile), MASTER_PORT=str(port), MMP_FORWARD_ENV="LIFECYCLE_[A-Z_]*",
               **(env_extra or {}))
    cmd = ["bash", str(tk.REPO / "launch" / "deepspeed.sh"), *_overrides(out, data, *extra)]
    return _popen(on_node("node1", cmd), env, out.parent / f"{out.name}-node1.log")


class SlurmJob:
    """A 2-node job submitted from node1 with mmpretrain-submit --nodes 2: `--launcher srun` (one srun
    task per process) or `torchrun` (one srun task per node running torchrun, c10d across the nodes)."""

    def __init__(self, cluster, out: Path, data: Path, *extra: str, env_extra=None, launcher: str = "srun") -> None:
        self.env = _env(cluster, **(env_extra or {}))
        self.out = out
        sub = subprocess.run(
            on_node("node1", [sys.executable, "-m", "mmpretrain.submit", "--nodes", "2", "--launcher", launcher,
                              "--gpus-per-node", "0", "--procs-per-node", "2", "--cpus-per-task",
                              "2" if launcher == "torchrun" else "1", "--time", "15",
                              "--signal-seconds", "120", "--workdir", str(tk.REPO), *_overrides(out, data, *extra)]),
            cwd=tk.REPO, env=self.env, capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        self.id = (out / "slurm_jobs.txt").read_text().split("\t")[0]
        assert self.id.isdigit(), sub.stdout
        self.out_file = out / "slurm" / f"tiny-{self.id}.out"

    def ctl(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(on_node("node1", list(cmd)), env=self.env, capture_output=True, text=True, timeout=60)

    def fields(self) -> Dict[str, str]:
        return dict(re.findall(r"(\w+)=(\S+)", self.ctl("scontrol", "show", "job", self.id).stdout))

    def done(self) -> bool:
        return self.fields().get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")

    def log(self) -> str:
        return self.out_file.read_text() if self.out_file.exists() else "(no job output yet)"

    def diag(self) -> str:
        return f"scontrol: {self.fields()}\n--- {self.out_file}\n{self.log()[-5000:]}"


def _wait(cond: Callable[[], bool], timeout: float, what: str, diag: Callable[[], str] = lambda: "") -> None:
    end = time.time() + timeout
    while not cond():
        if time.time() > end:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{diag()}")
        time.sleep(0.25)


def _steps(out: Path) -> int:
    rows = tk.train_rows(out)
    return rows[-1]["step"] if rows else 0


def _run_processes(out: Path) -> List[int]:
    """Live processes (any node: the file system is shared, /proc too) whose command line names `out`."""
    needle = str(out).encode()
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "cmdline").read_bytes() and tk.alive(int(d.name)):
                    found.append(int(d.name))
            except OSError:
                continue
    return found


def _node_pids(node: str) -> List[int]:
    out = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _cleanup(procs: List[subprocess.Popen], outs: List[Path], jobs: List[SlurmJob]) -> None:
    for job in jobs:
        job.ctl("scancel", job.id)
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(30)
    # ranks started through sshd or slurmd are not in our process groups
    for out in outs:
        for pid in _run_processes(out):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _rank_hosts(out: Path, per_node: int = 2) -> Dict[int, str]:
    """rank -> host name from the rank logs; ranks of one node are consecutive with local ranks 0.."""
    hosts = {}
    for r in range(4):
        text = (out / "logs" / f"rank{r}.log").read_text()
        m = re.findall(rf"rank={r}/4 local_rank=(\d) host=(\S+)", text)
        assert m, text[:2000]
        local, host = m[-1]
        assert int(local) == r % per_node
        hosts[r] = host
    return hosts


def _two_nodes_two_ranks_each(out: Path) -> None:
    """Two ranks per node, each node's consecutive (torchrun's c10d may give node2 the lower ranks)."""
    h = _rank_hosts(out)
    assert h[0] == h[1] and h[2] == h[3] and {h[0], h[2]} == {"node1", "node2"}, (out.name, h)


def test_three_two_node_launch_paths_equal_one_node_four_processes(two_nodes, tiny_data, tmp_path):
    """All four jobs at once (their start-ups overlap): a 1-node 4-process reference, torchrun on both
    nodes, the deepspeed launcher over pdsh/ssh, and a SLURM job (srun torchrun on each node) preempted
    with `scancel --signal=USR1 --batch` mid-run, requeued by its script and resumed. (The node-loss
    test's SLURM job runs one srun task per process: both submit launchers run across two nodes.)"""
    outs = {name: tmp_path / name for name in ("ref", "torchrun", "deepspeed", "slurm")}
    procs: List[subprocess.Popen] = []
    jobs: List[SlurmJob] = []
    t0 = time.time()
    try:
        ref = _popen(["bash", str(tk.REPO / "launch" / "torchrun.sh"), *_overrides(outs["ref"], tiny_data)],
                     _env(two_nodes, NPROC_PER_NODE="4"), tmp_path / "ref.log")
        procs.append(ref)
        procs += start_torchrun(two_nodes, outs["torchrun"], tiny_data, 29400)
        procs.append(start_deepspeed(two_nodes, outs["deepspeed"], tiny_data, 29401))
        # the job's first run sleeps 1 s before each step after step 3: the signal lands mid-run
        job = SlurmJob(two_nodes, outs["slurm"], tiny_data, lk.plugin("slow_first_run"),
                       env_extra={lk.SLOW_AFTER_VAR: "3:1.0"}, launcher="torchrun")
        jobs.append(job)
        _wait(lambda: _steps(outs["slurm"]) >= 3, 300, "3 steps of the SLURM job", job.diag)
        sig = job.ctl("scancel", "--signal=USR1", "--batch", job.id)
        assert sig.returncode == 0, sig.stderr
        for p in procs:
            _wait(lambda: p.poll() is not None, max(30.0, 420 - (time.time() - t0)), "a launcher to exit")
        _wait(job.done, max(60.0, 480 - (time.time() - t0)), "the SLURM job to finish", job.diag)
        took = time.time() - t0
    finally:
        _cleanup(procs, list(outs.values()), jobs)
    for p in procs:
        assert p.returncode == 0, f"{p.log_path.name}: exit {p.returncode}\n{p.log_path.read_text()[-5000:]}"
    fields = job.fields()
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", job.diag()
    assert fields.get("Restarts") == "1" and fields.get("NumNodes") == "2", job.diag()
    log = job.log()
    assert "caught SIGUSR1" in log and f"requeueing job {job.id}" in log, log[-4000:]
    assert "nodes=node[1-2] master=node1:" in log, log[-4000:]
    preempted = [r for r in tk.metrics_rows(outs["slurm"]) if r.get("kind") == "preempted"]
    assert len(preempted) == 1 and 3 <= preempted[0]["step"] < STEPS, preempted
    step = preempted[0]["step"]
    for rank in range(4):
        assert f"resumed from {outs['slurm']}/checkpoints/step_{step:08d} (step {step})" in \
            (outs["slurm"] / "logs" / f"rank{rank}.log").read_text()

    # ranks 0-1 on node1, 2-3 on node2 (each with its own host name and local ranks 0-1); the
    # reference's 4 ranks on this host
    for name in ("torchrun", "deepspeed", "slurm"):
        _two_nodes_two_ranks_each(outs[name])
    assert set(_rank_hosts(outs["ref"], per_node=4).values()) == {socket.gethostname()}

    ref_losses = tk.losses_by_step(outs["ref"])
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    ref_w = tk.final_weights(outs["ref"])
    for name in ("torchrun", "deepspeed", "slurm"):
        assert tk.losses_by_step(outs[name]) == ref_losses, name
        assert (outs[name] / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}", name
        tk.assert_same_weights(tk.final_weights(outs[name]), ref_w)
    print(f"\nfour jobs (16 processes) in {took:.0f} s; SLURM preempted at step {step}")


def test_losing_a_node_ends_every_launcher_and_slurm_resumes(two_nodes, tiny_data, tmp_path):
    """SIGKILL every process of node2 (its sshd and slurmd too) while torchrun, deepspeed/pdsh and a
    SLURM job each run across both nodes: node1's ranks exit with a message within the collective
    timeout + 30 s, and once node2 is back the SLURM job, requeued by its script, resumes from the
    last complete checkpoint and finishes."""
    # every run holds at the top of step 6 (step 4's checkpoint complete) until the test lets go, just
    # after the kill: runs started at different times all stand mid-run, and the SLURM job's second run
    # (after the requeue) never holds
    steps, hold = 12, tmp_path / "hold"
    hold.touch()
    extra = (f"train.steps={steps}", "train.save_every=2", f"train.dist_timeout_minutes={DIST_TIMEOUT_MIN}",
             lk.plugin("hold_while_file"))
    held = {lk.HOLD_VAR: f"6:{hold}"}
    outs = {name: tmp_path / name for name in ("torchrun", "deepspeed", "slurm")}
    procs: List[subprocess.Popen] = []
    jobs: List[SlurmJob] = []
    gone: Dict[str, Optional[float]] = {name: None for name in outs}
    try:
        tr = start_torchrun(two_nodes, outs["torchrun"], tiny_data, 29410, *extra, env_extra=held)
        ds = start_deepspeed(two_nodes, outs["deepspeed"], tiny_data, 29411, *extra, env_extra=held)
        procs += [*tr, ds]
        job = SlurmJob(two_nodes, outs["slurm"], tiny_data, *extra, env_extra=held)
        jobs.append(job)
        def step5(name: str) -> bool:
            for p in procs:
                if p.poll() is not None:
                    pytest.fail(f"{p.log_path.name} ended early ({p.returncode}):\n{p.log_path.read_text()[-4000:]}")
            return _steps(outs[name]) >= 5

        for name in outs:  # every run holds at step 6, with step 4's checkpoint complete
            _wait(lambda: step5(name), 300, f"step 5 of {name}", job.diag)
        victims = _node_pids("node2")
        assert victims, "nothing runs on node2"
        t_kill = time.time()
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        hold.unlink()  # node1's ranks go on into step 6, whose collectives have lost their peers
        limit = DIST_TIMEOUT_MIN * 60 + 30
        while any(v is None for v in gone.values()) and time.time() - t_kill < limit + 30:
            for name, out in outs.items():
                if gone[name] is None and not _run_processes(out):
                    gone[name] = time.time() - t_kill
            time.sleep(0.2)
        for name, t in gone.items():
            assert t is not None and t <= limit, f"{name}: processes left {limit + 30:.0f} s after node2 was lost"
        # the newest checkpoint all four ranks completed before the loss: where the SLURM job resumes
        last_ckpt = max(int(p.name[5:]) for p in (outs["slurm"] / "checkpoints").glob("step_*")
                        if (p / "COMPLETE").exists())
        assert last_ckpt == 4

        back = subprocess.run(["bash", str(ON_NODE.parent / "cluster.sh"), "node-up", "node2"], env=job.env,
                              capture_output=True, text=True, timeout=180)
        assert back.returncode == 0, back.stderr[-3000:]
        _wait(job.done, 300, "the requeued SLURM job to finish", job.diag)
    finally:
        _cleanup(procs, list(outs.values()), jobs)

    for p in procs:
        assert p.returncode not in (0, None)
    for name, out in outs.items():
        survivors = [r for r, h in _rank_hosts(out).items() if h == "node1"]
        assert len(survivors) == 2, (name, _rank_hosts(out))
        rank_logs = "".join((out / "logs" / f"rank{r}.log").read_text() for r in survivors)
        assert re.search(r"rank \d: lost rank", rank_logs) and "a collective failed" in rank_logs, \
            f"{name}: no message on node1\n{rank_logs[-3000:]}"
    fields = job.fields()
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", job.diag()
    assert int(fields.get("Restarts", "0")) >= 1, job.diag()
    # requeued by its script ("a rank was lost"), or by slurmctld itself when it marked node2 down and
    # requeued the job (--requeue) before the script's echo ran: a race; the restart count shows either
    log = job.log()
    assert "a rank was lost" in log or "SLURM_RESTART_COUNT=1" in log, log[-4000:]
    resumed = f"resumed from {outs['slurm']}/checkpoints/step_{last_ckpt:08d}"
    assert resumed in (outs["slurm"] / "logs" / "rank0.log").read_text()
    assert _steps(outs["slurm"]) == steps
    print("\nseconds from SIGKILL of node2 to the exit of node1's last process: "
          + ", ".join(f"{k} {v:.1f}" for k, v in gone.items()) + f"; SLURM resumed from step {last_ckpt}")
