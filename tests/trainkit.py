"""Helpers for tests that run real training processes: tiny data, the tiny config, free ports,
launchers, metrics and the final weights of a run."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TINY_CONFIG = REPO / "configs" / "tiny_test.yaml"  # the one tiny test config (tests/models/tiny.py loads it too)


def make_tiny_data(out: Path) -> Path:
    """256 train samples in 4 shards + 64 eval, 32 px images, 0.25 s audio at 4 kHz, the rate of
    TINY_CONFIG (no resampling: no scipy.signal import in every rank) (~3 s); tests use the session
    fixture `tiny_data` (tests/conftest.py), the SLURM tests a copy of their own."""
    if not (out / "eval" / "eval-000000.tar").exists():
        subprocess.run([sys.executable, str(REPO / "tools/make_demo_data.py"), "--out", str(out), "--train", "256",
                        "--eval", "64", "--shard-size", "64", "--image-size", "32", "--clip-seconds", "0.25",
                        "--sample-rate", "4000"],
                       check=True, capture_output=True)
    return out


def tiny_overrides(out_dir: Path, data: Path, *extra: str, eval_: bool = False) -> List[str]:
    """Point TINY_CONFIG at the tiny shards (`make_tiny_data`) and a run directory; `extra` after."""
    return [
        f"run.output_dir={out_dir}",
        f"data.train=[{{name: tiny, urls: '{data}/train/train-{{000000..000003}}.tar'}}]",
        *([f"data.eval_urls={data}/eval/eval-000000.tar"] if eval_ else []),
        *extra,
    ]


def env(**extra: str) -> Dict[str, str]:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO),
              "PATH": f"{VENV_BIN}:{e.get('PATH', '')}", "PYTHONUNBUFFERED": "1"})
    e.pop("TRITON_INTERPRET", None)  # attention on SDPA: speed, and the launchers' children agree
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))  # built by `make install`
    # MMPRETRAIN_TEST_SESSION (tests/conftest.py) is inherited from os.environ: the end-of-suite orphan check
    e.update(extra)
    return e


def launch_cmd(launcher: str, nproc: int, overrides: Sequence[str], port: int) -> List[str]:
    cfg = ["--config", str(TINY_CONFIG), *overrides]
    if launcher == "torchrun":
        return [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(port),
                "-m", "mmpretrain.train", *cfg]
    if launcher == "deepspeed":
        return [str(VENV_BIN / "deepspeed"), "--num_accelerators", str(nproc), "--master_port", str(port),
                "--module", "mmpretrain.train", *cfg]
    if launcher == "single":
        return [sys.executable, "-m", "mmpretrain.train", *cfg]
    raise ValueError(launcher)


_GIVEN: set = set()


def free_port() -> int:
    """A TCP port the OS reports free (bind to port 0), never one this process handed out before."""
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def start(launcher: str, nproc: int, overrides: Sequence[str], log: Path, **env_extra: str) -> subprocess.Popen:
    f = open(log, "ab")
    port = free_port()
    env_extra.setdefault("MASTER_PORT", str(port))  # the single-process run's own group too
    return subprocess.Popen(launch_cmd(launcher, nproc, overrides, port), cwd=REPO, env=env(**env_extra),
                            stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def run(launcher: str, nproc: int, overrides: Sequence[str], log: Path, timeout: float = 300, **env_extra: str) -> int:
    p = start(launcher, nproc, overrides, log, **env_extra)
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"training timed out; log:\n{log.read_text()[-4000:]}")
    finally:  # an interrupted caller (Ctrl-C, a benchmark's SIGTERM) leaves no launcher or rank behind
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def kill_group(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
    p.wait(60)


def metrics_rows(out_dir: Path) -> List[dict]:
    """Every record of a run's metrics.jsonl so far (a line being written or cut by a kill is left out)."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def train_rows(out_dir: Path) -> List[dict]:
    return [r for r in metrics_rows(out_dir) if r.get("kind") == "train"]


def wait_for_step(p: subprocess.Popen, out_dir: Path, step: int, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        rows = train_rows(out_dir)
        if rows and rows[-1]["step"] >= step:
            return
        if p.poll() is not None:
            raise AssertionError(f"training ended (exit {p.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def losses_by_step(out_dir: Path) -> Dict[int, float]:
    """Last logged loss per step (a resumed run re-logs steps after its checkpoint)."""
    return {r["step"]: r["loss"] for r in train_rows(out_dir)}


def final_weights(out_dir: Path) -> Dict[str, torch.Tensor]:
    from mmpretrain.checkpoint import complete_checkpoints, consolidated_state_dict

    return consolidated_state_dict(complete_checkpoints(out_dir / "checkpoints")[-1])


def assert_same_weights(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"parameters differ: {dict(list(diff.items())[:5])}"


def descendants(pid: int) -> List[int]:
    """Every live descendant of `pid` (from /proc), children first."""
    children: Dict[int, List[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        c = todo.pop(0)
        out.append(c)
        todo.extend(children.get(c, []))
    return out


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def rank_pid(p: subprocess.Popen, rank: int) -> int:
    """The pid of training rank `rank` among the descendants of launcher `p` (its RANK variable)."""
    for pid in descendants(p.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"mmpretrain.train" in cmd and f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"rank {rank} of launcher {p.pid} not found")


def start_env_ranks(nproc: int, overrides: Sequence[str], log_dir: Path, **env_extra: str) -> List[subprocess.Popen]:
    """`nproc` ranks started directly (RANK/WORLD_SIZE/MASTER_* exported, no launcher that would
    tear the others down when one dies), each in its own session; logs in log_dir/rank{r}.out."""
    port = free_port()
    procs = []
    for r in range(nproc):
        e = env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env_extra)
        f = open(log_dir / f"rank{r}.out", "ab")
        procs.append(subprocess.Popen([sys.executable, "-m", "mmpretrain.train", "--config", str(TINY_CONFIG),
                                       *overrides], cwd=REPO, env=e, stdout=f, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs
