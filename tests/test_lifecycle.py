"""The run lifecycle under faults (issue 13, items 2-6), black-box through the CLI: ranks die with
their launcher, one writer per run directory, a dead rank ends the others with exit 76 naming it,
the hang watchdog dumps stacks, a preemption signal during start-up exits 75 with PREEMPTED
naming the signal and its rank, and a TERM during teardown leaves a clean exit."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import lifecyclekit as lk
import trainkit as tk
from mmpretrain.lifecycle import HANG_EXIT_CODE, LOCK_NAME, PEER_LOST_EXIT_CODE
from mmpretrain.preemption import PREEMPTED_MARKER, REQUEUE_EXIT_CODE


def _kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _step_dirs(out: Path):
    return sorted(p.name for p in (out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else []


@pytest.mark.distributed
def test_ranks_die_with_their_launcher(tiny_data, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    p = tk.start("torchrun", 2, tk.tiny_overrides(out, tiny_data, "train.steps=100000", "train.save_every=2"), log)
    pids = []
    try:
        tk.wait_for_step(p, out, 3)
        pids = tk.descendants(p.pid)
        assert len([q for q in pids if tk.alive(q)]) >= 2, pids
        ranks = [tk.rank_pid(p, r) for r in (0, 1)]
        os.kill(p.pid, signal.SIGKILL)  # the launcher only, not its group (the ranks are in new sessions)
        t0, ranks_s = time.time(), None
        while any(tk.alive(q) for q in pids) and time.time() - t0 < 10:
            if ranks_s is None and not any(tk.alive(q) for q in ranks):
                ranks_s = time.time() - t0
            time.sleep(0.02)
        gone_s = time.time() - t0
        assert not any(tk.alive(q) for q in pids), f"orphans still alive {gone_s:.1f} s after the launcher's death"
        steps, rows = _step_dirs(out), len(tk.train_rows(out))
        time.sleep(3)
        assert _step_dirs(out) == steps and len(tk.train_rows(out)) == rows, "something still writes the run"
        print(f"\nranks gone {ranks_s or gone_s:.2f} s, their loader workers too {gone_s:.2f} s after kill -9 "
              "of torchrun")
    finally:
        _kill_all(pids)
        tk.kill_group(p)


def test_one_writer_per_run_directory(tiny_data, tmp_path):
    out = tmp_path / "run"
    first = tk.start("single", 1, tk.tiny_overrides(out, tiny_data, "train.steps=100000"), tmp_path / "first.log")
    try:
        tk.wait_for_step(first, out, 1)
        rows = len(tk.train_rows(out))
        second_log = tmp_path / "second.log"
        rc = tk.run("single", 1, tk.tiny_overrides(out, tiny_data, "train.steps=2"), second_log)
        text = second_log.read_text()
        assert rc == 2, text[-3000:]
        errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and f"in use by pid {first.pid} on host" in errors[0], text[-3000:]
        assert "Traceback" not in text
        assert first.poll() is None and len(tk.train_rows(out)) >= rows  # the holder goes on undisturbed
    finally:
        tk.kill_group(first)  # SIGKILL: the lock stays behind, its holder provably gone
    assert (out / LOCK_NAME).exists()
    third_log = tmp_path / "third.log"
    rc = tk.run("single", 1, tk.tiny_overrides(out, tiny_data, "train.steps=2"), third_log)
    assert rc == 0, third_log.read_text()[-3000:]
    assert f"took over the run directory lock of pid {first.pid}" in (out / "logs" / "rank0.log").read_text()
    assert not (out / LOCK_NAME).exists()  # released at exit


@pytest.mark.distributed
def test_dead_rank_ends_the_others_with_peer_lost_code(tiny_data, tmp_path):
    out = tmp_path / "run"
    timeout_min = 0.2
    procs = tk.start_env_ranks(2, tk.tiny_overrides(out, tiny_data, "train.steps=100000",
                                                    f"train.dist_timeout_minutes={timeout_min}"), tmp_path)
    try:
        tk.wait_for_step(procs[0], out, 3)
        os.killpg(procs[1].pid, signal.SIGKILL)  # rank 1 and its loader worker
        t0 = time.time()
        rc = procs[0].wait(timeout_min * 60 + 30)
        took = time.time() - t0
        text = (tmp_path / "rank0.out").read_text()
        assert rc == PEER_LOST_EXIT_CODE, text[-3000:]
        assert "lost rank 1" in text, text[-3000:]
        print(f"\nrank 0 exited {rc} {took:.1f} s after rank 1 was killed")
    finally:
        for p in procs:
            tk.kill_group(p)


@pytest.mark.distributed
def test_hang_watchdog_dumps_every_rank_stacks(tiny_data, tmp_path):
    out = tmp_path / "run"
    over = tk.tiny_overrides(out, tiny_data, "train.steps=20", "train.hang_timeout_minutes=0.1",
                             lk.plugin("hang"))
    # ranks without a launcher (torchrun would tear the others down when the first one exits);
    # every rank sleeps at the top of step 3
    procs = tk.start_env_ranks(2, over, tmp_path, **{lk.HANG_VAR: "3:-1"})
    try:
        tk.wait_for_step(procs[0], out, 2)
        t0 = time.time()
        rcs = [p.wait(60) for p in procs]
        took = time.time() - t0
    finally:
        for p in procs:
            tk.kill_group(p)
    for r in (0, 1):
        text = (tmp_path / f"rank{r}.out").read_text()
        assert rcs[r] == HANG_EXIT_CODE, text[-3000:]
        dump = out / "logs" / f"hang_rank{r}.txt"
        assert dump.exists(), text[-3000:]
        assert "lifecyclekit.py" in dump.read_text() and "train_step" in dump.read_text()
        assert f"stacks in {dump}" in text and f"exiting with {HANG_EXIT_CODE}" in text
    print(f"\nhang detected and the run ended {took:.1f} s after step 2 (timeout 6 s)")


@pytest.mark.distributed
def test_preemption_signal_during_startup_exits_for_requeue(tiny_data, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    over = tk.tiny_overrides(out, tiny_data, "train.steps=20", lk.plugin("startup_pause"))
    p = tk.start("torchrun", 2, over, log, **{lk.STARTUP_DIR_VAR: str(tmp_path), lk.STARTUP_SLEEP_VAR: "3"})
    try:
        marker = tmp_path / "startup_rank1"
        t0 = time.time()
        while not marker.exists() and p.poll() is None and time.time() - t0 < 120:
            time.sleep(0.05)
        assert marker.exists(), log.read_text()[-3000:]
        os.kill(int(marker.read_text()), signal.SIGUSR1)  # rank 1, while it starts up
        p.wait(120)
    finally:
        tk.kill_group(p)
    text = log.read_text()
    assert (out / PREEMPTED_MARKER).read_text().split() == ["step=0", "signal=SIGUSR1", "rank=1"], text[-3000:]
    ranks_part = text.split("ChildFailedError")[0].split("Traceback (most recent call last)")  # torchrun's own after
    assert f"exiting with code {REQUEUE_EXIT_CODE}" in ranks_part[0], text[-3000:]
    assert "Traceback" not in ranks_part[0] and len(ranks_part) <= 2, text[-3000:]
    assert f"exitcode  : {REQUEUE_EXIT_CODE}" in text, text[-3000:]  # torchrun's report of the first to exit
    assert not any("Traceback" in f.read_text() for f in (out / "logs").glob("rank*.log"))
    assert _step_dirs(out) == []  # nothing was trained, nothing saved
    assert not tk.train_rows(out)


def test_term_during_teardown_is_a_clean_exit(tiny_data, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    rc = tk.run("single", 1, tk.tiny_overrides(out, tiny_data, "train.steps=2", lk.plugin("term_in_teardown")), log)
    assert rc == 0, log.read_text()[-3000:]
    assert "SIGTERM arrived after the final save" in (out / "logs" / "rank0.log").read_text()


_BLOCKED_IN_RENDEZVOUS = """
import socket, sys, datetime
from mmpretrain import preemption
import torch.distributed as dist
preemption.install_early()
port = int(sys.argv[1])
with preemption.exit_on_signal_while_blocked("the rendezvous"):
    print("connecting", flush=True)
    # a client store to a port that accepts the connection but never answers: blocked in C++
    dist.TCPStore("127.0.0.1", port, 2, False, timeout=datetime.timedelta(seconds=120))
print("returned", flush=True)
"""


def test_signal_during_a_blocked_rendezvous_exits_for_requeue_at_once(tmp_path):
    """The launcher's SIGTERM reaches a rank stuck in the rendezvous (before: ignored until the
    store timeout or the launcher's SIGKILL 30 s later)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        p = subprocess.Popen([sys.executable, "-c", _BLOCKED_IN_RENDEZVOUS, str(silent.getsockname()[1])],
                             env=tk.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        try:
            assert p.stdout.readline().strip() == "connecting"
            time.sleep(1.0)  # inside the blocking call
            t0 = time.perf_counter()
            p.send_signal(signal.SIGTERM)
            rc = p.wait(20)
            took = time.perf_counter() - t0
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    err = p.stderr.read()
    assert rc == REQUEUE_EXIT_CODE, err
    assert "SIGTERM during the rendezvous" in err and took < 3, (took, err)


_SIGNALLED_BEFORE_RENDEZVOUS = """
import os, signal, sys, time
from mmpretrain import preemption
preemption.install_early()
os.kill(os.getpid(), signal.SIGTERM)  # the launcher tears down while this rank still imports
time.sleep(0.2)
with preemption.exit_on_signal_while_blocked("the rendezvous"):
    print("entered", flush=True)
    time.sleep(30)  # stands for a rendezvous with peers that are gone
print("returned", flush=True)
"""


def test_signal_before_the_rendezvous_exits_instead_of_blocking(tmp_path):
    """A TERM recorded during start-up (imports, preflight) is not held for the first step when the
    rank reaches the rendezvous: the peers that would meet it may be gone (before: the deepspeed
    launcher's SIGKILL 30 s later)."""
    import subprocess
    import sys

    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _SIGNALLED_BEFORE_RENDEZVOUS], env=tk.env(), capture_output=True,
                         text=True, timeout=60, start_new_session=True)
    took = time.perf_counter() - t0
    assert res.returncode == REQUEUE_EXIT_CODE and "entered" not in res.stdout, res
    assert "SIGTERM during start-up, before the rendezvous" in res.stderr and took < 10, (took, res.stderr)


def test_start_up_does_not_load_inductor_for_deepspeeds_muon(tiny_data, tmp_path):
    """DeepSpeed's ZeRO path imports its Muon optimizer (torch.compile at import: TorchInductor,
    ~3-4 s of CPU per rank); a whole ZeRO-2 run must train without loading it."""
    import json

    out, log, rec = tmp_path / "run", tmp_path / "run.log", tmp_path / "modules.json"
    over = tk.tiny_overrides(out, tiny_data, "train.steps=2", "train.zero_stage=2", lk.plugin("record_modules"))
    assert tk.run("single", 1, over, log, **{lk.MODULES_OUT_VAR: str(rec)}) == 0, log.read_text()[-3000:]
    assert json.loads(rec.read_text()) == {"torch._inductor.compile_fx": False,
                                           "deepspeed.runtime.zero.muon.original_muon": False}
    assert len(tk.train_rows(out)) == 2
