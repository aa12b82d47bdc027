"""Bad input is refused early (issue 13, items 7-9): `python -m mmpretrain.train` exits 2 with ONE
line naming the key (or shard / file) and the value, no traceback, before any process group,
and the run directory is not created. Schema refusals do not even import torch."""
from __future__ import annotations

import gzip
import io
import os
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

import trainkit as tk

TINY = str(tk.TINY_CONFIG)


def _shard(path: Path, samples: int = 2) -> Path:
    with tarfile.open(path, "w") as tf:
        for i in range(samples):
            data = f"caption {i}".encode()
            ti = tarfile.TarInfo(f"s{i:04d}.txt")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    good = _shard(d / "good-000000.tar")
    (d / "gz-000000.tar").write_bytes(gzip.compress(good.read_bytes()))
    (d / "empty-000000.tar").write_bytes(b"")
    (d / "text-000000.tar").write_text("a caption, not a tar file\n" * 40)
    with tarfile.open(d / "nomembers-000000.tar", "w"):
        pass
    return d


def _train(args, cwd, env_extra=None, timeout=120):
    env = tk.env()
    env.pop("MASTER_PORT", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "mmpretrain.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# the CLI's main, then on stdout which heavy modules it imported (a refusal must not pay for torch)
_MAIN_THEN_MODULES = ("import sys, mmpretrain.train as t\n"
                      "rc = t.main(sys.argv[1:])\n"
                      "print('IMPORTED', sorted(m for m in ('torch', 'deepspeed', 'webdataset') if m in sys.modules))\n"
                      "sys.exit(rc)\n")


def _assert_refused(res, out: Path, *names: str) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    text = res.stdout + res.stderr
    assert res.returncode == 2, f"exit {res.returncode}:\n{text[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one line:\n{res.stderr[-3000:]}"
    assert "Traceback" not in text
    for n in names:
        assert n in lines[0], f"{n!r} not in: {lines[0]}"
    assert not out.exists(), f"{out} was created"
    return lines[0]


def _src(urls: str) -> str:
    return f"data.train=[{{name: a, urls: '{urls}'}}]"


# (id, overrides given the shards dir, strings the one line must hold)
CASES = [
    ("lr_nan", lambda d: ["optim.lr=nan"], ["optim.lr", "nan", "finite"]),
    ("lr_inf", lambda d: ["optim.lr=inf"], ["optim.lr", "inf"]),
    ("weight_nan", lambda d: [f"data.train=[{{name: a, urls: '{d}/good-000000.tar', weight: nan}}]"],
     ["data.train[0].weight", "nan"]),
    ("grad_clip_inf", lambda d: ["train.grad_clip=inf"], ["train.grad_clip", "inf"]),
    ("optim_int", lambda d: ["optim=3"], ["'optim'", "3"]),
    ("no_sources", lambda d: ["data.train=[]"], ["data.train", "lists no sources"]),
    ("unbalanced_brace", lambda d: [_src(f"{d}/good-{{000000..000001.tar")], ["data.train[0].urls", "unbalanced braces", "{000000..000001"]),
    ("no_match", lambda d: [_src(f"{d}/nothing-*.tar")], ["data.train[0].urls", "nothing-*.tar", "matches no shards"]),
    ("missing_shards", lambda d: [_src(f"{d}/good-{{000000..000003}}.tar")], ["good-000001.tar", "does not exist", "3 of 4"]),
    ("gzip", lambda d: [_src(f"{d}/gz-000000.tar")], ["gz-000000.tar", "gzip-compressed"]),
    ("empty_file", lambda d: [_src(f"{d}/empty-000000.tar")], ["empty-000000.tar", "is empty"]),
    ("not_tar", lambda d: [_src(f"{d}/text-000000.tar")], ["text-000000.tar", "is not a tar file"]),
    ("no_members", lambda d: [_src(f"{d}/nomembers-000000.tar")], ["nomembers-000000.tar", "hold no samples"]),
    ("resume_missing", lambda d: [_src(f"{d}/good-000000.tar"), "train.resume=/nonexistent/ckpt"],
     ["train.resume", "/nonexistent/ckpt", "no such checkpoint"]),
    ("resume_incomplete", lambda d: [_src(f"{d}/good-000000.tar"), f"train.resume={d}"], ["train.resume", "shards'", "COMPLETE"]),
    ("tokenizer_missing", lambda d: [_src(f"{d}/good-000000.tar"), f"data.tokenizer={d}/tok.json"],
     ["data.tokenizer", "tok.json", "no such file"]),
    ("tokenizer_bad", lambda d: [_src(f"{d}/good-000000.tar"), f"data.tokenizer={d}/empty-000000.tar"],
     ["data.tokenizer", "empty-000000.tar", "cannot be loaded"]),
]


@pytest.mark.parametrize("name, overrides, names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(shards, tmp_path, name, overrides, names):
    """Each refusal, from the CLI's main in a fresh interpreter: one line, and no torch imported (a refused
    config, shard list or tokenizer costs a fraction of a second, not the seconds of a torch import)."""
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-c", _MAIN_THEN_MODULES, "--config", TINY, f"run.output_dir={out}",
                          *overrides(shards)], cwd=tmp_path, env=tk.env(), capture_output=True, text=True,
                         timeout=120)
    _assert_refused(res, out, *names)
    assert "IMPORTED []" in res.stdout, res.stdout


@pytest.mark.parametrize("case", ["proc", "under_file", "readonly"])
def test_unusable_output_dir_is_refused(shards, tmp_path, case):
    if case == "proc":
        out, names = Path("/proc/mmpretrain-run"), ["run.output_dir", "/proc/mmpretrain-run", "/proc"]
    elif case == "under_file":
        out, names = shards / "good-000000.tar" / "run", ["run.output_dir", "good-000000.tar/run", "is a file"]
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a mode-0500 directory")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        out, names = ro / "run", ["run.output_dir", "not writable"]
    res = _train(["--config", TINY, f"run.output_dir={out}", _src(f"{shards}/good-000000.tar")], cwd=tmp_path)
    _assert_refused(res, out, *names)


def test_no_config_and_empty_yaml_are_refused(tmp_path):
    """No --config trains on defaults today; refused, and no runs/default/ appears in the cwd."""
    res = _train([], cwd=tmp_path)
    _assert_refused(res, tmp_path / "runs", "data.train", "lists no sources", "no --config")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    res = _train(["--config", str(empty)], cwd=tmp_path)
    _assert_refused(res, tmp_path / "runs", "data.train", "lists no sources", "empty.yaml")


def test_duplicate_yaml_keys_are_refused(tmp_path):
    out = tmp_path / "run"
    dup = tmp_path / "dup.yaml"
    dup.write_text(Path(TINY).read_text() + f"run:\n  output_dir: {out}\noptim:\n  lr: 5.0\n")
    res = _train(["--config", str(dup)], cwd=tmp_path)
    line = _assert_refused(res, out, "dup.yaml", "'run'", "twice")
    nested = tmp_path / "nested.yaml"
    nested.write_text("optim:\n  lr: 1.0e-3\n  lr: 5.0\n")
    res = _train(["--config", str(nested), f"run.output_dir={out}"], cwd=tmp_path)
    line = _assert_refused(res, out, "'lr'", "lines 2 and 3")
    assert "nested.yaml" in line


def test_schema_refusal_does_not_import_torch(tmp_path):
    """Item 7: a refused value costs no torch import (seconds of CPU before)."""
    out = tmp_path / "run"
    code = ("import sys, mmpretrain.train as t\n"
            f"rc = t.main(['--config', {TINY!r}, 'run.output_dir={out}', 'optim.lr=nan'])\n"
            "print('RESULT', rc, 'torch' in sys.modules, 'deepspeed' in sys.modules)\n")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=tk.env(), capture_output=True, text=True,
                         timeout=120)
    took = time.perf_counter() - t0
    assert "RESULT 2 False False" in res.stdout, res.stdout + res.stderr
    assert "optim.lr" in res.stderr and not out.exists()
    print(f"schema refusal: {took:.2f} s")


# ----------------------------------------------------------------------------- item 9: ports


@pytest.fixture
def taken_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def test_rank0_refuses_a_port_held_by_another_process(shards, tmp_path, taken_port):
    out = tmp_path / "run"
    res = _train(["--config", TINY, f"run.output_dir={out}", _src(f"{shards}/good-000000.tar")], cwd=tmp_path,
                 env_extra={"MASTER_PORT": str(taken_port), "MASTER_ADDR": "127.0.0.1", "RANK": "0",
                            "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    _assert_refused(res, out, f"MASTER_PORT={taken_port}", "already in use", "--master_port")


def _launch_env(**extra):
    e = tk.env(**{"PYTHON": sys.executable, "NPROC_PER_NODE": "2", "NUM_GPUS": "2", **extra})
    for k in ("MASTER_ADDR", "MASTER_PORT", "HOSTFILE", "NNODES"):
        if k not in extra:
            e.pop(k, None)
    return e


@pytest.mark.parametrize("script", ["deepspeed", "accelerate", "torchrun"])
def test_launch_scripts_refuse_a_taken_port(tmp_path, taken_port, script):
    extra = {"MASTER_PORT": str(taken_port), "MASTER_ADDR": "127.0.0.1"}
    if script == "torchrun":
        extra["NNODES"] = "2"  # the multi-node path; one node uses --standalone (a free port)
    t0 = time.perf_counter()
    res = subprocess.run(["bash", str(tk.REPO / "launch" / f"{script}.sh"), "--config", TINY,
                          f"run.output_dir={tmp_path / 'run'}"], cwd=tmp_path, env=_launch_env(**extra),
                         capture_output=True, text=True, timeout=60)
    _assert_refused(res, tmp_path / "run", f"MASTER_PORT={taken_port}", "already in use")
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("script, flag", [("deepspeed", "--master_port"), ("accelerate", "--main_process_port")])
def test_single_node_launch_scripts_pick_a_free_port(tmp_path, script, flag):
    """Without MASTER_PORT the scripts pass a free port, not the launchers' 29500 (maybe another job's)."""
    fake = tmp_path / "python"  # records the launcher's command line instead of starting it
    log = tmp_path / "argv.txt"
    fake.write_text(f"#!/bin/sh\nif [ \"$2\" = mmpretrain.preflight ]; then exec {sys.executable} \"$@\"; fi\n"
                    f"printf '%s\\n' \"$@\" > {log}\n")
    fake.chmod(0o755)
    res = subprocess.run(["bash", str(tk.REPO / "launch" / f"{script}.sh"), "--config", TINY], cwd=tmp_path,
                         env=_launch_env(PYTHON=str(fake)), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    argv = log.read_text().splitlines()
    port = int(argv[argv.index(flag) + 1])
    assert port != 29500 and 0 < port < 65536
    with socket.socket() as s:  # free: nobody listens there
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))


@pytest.mark.distributed
def test_deepspeed_launch_on_a_taken_port_says_so(shards, tmp_path, taken_port):
    """2 processes under the deepspeed launcher on a port another process holds: rank 0 refuses in
    one line naming the port (before: a raw EADDRINUSE traceback after ~78 s)."""
    out = tmp_path / "run"
    cmd = tk.launch_cmd("deepspeed", 2, [f"run.output_dir={out}", _src(f"{shards}/good-000000.tar")], taken_port)
    want = f"error: MASTER_PORT={taken_port} on 127.0.0.1 is already in use"
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=tmp_path, env=_launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    lines, said = [], None
    try:
        for line in p.stdout:  # ends when the launcher and its ranks are gone
            lines.append(line)
            if said is None and want in line:
                said = time.perf_counter() - t0
            if time.perf_counter() - t0 > 240:
                break
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    took, text = time.perf_counter() - t0, "".join(lines)
    assert p.returncode != 0
    assert said is not None and said < 90, text[-3000:]
    assert "EADDRINUSE" not in text and "Traceback" not in text, text[-3000:]
    assert not out.exists()
    # the other rank, blocked in the rendezvous, ends on the launcher's SIGTERM (before: its SIGKILL 30 s later)
    assert took < said + 15, f"launcher done {took - said:.1f} s after the refusal\n" + text[-3000:]
    print(f"deepspeed launch on a taken port: refused after {said:.1f} s, launcher done in {took:.1f} s")
