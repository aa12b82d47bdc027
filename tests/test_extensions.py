"""DeepSpeed's ops are built once per environment by `make install` (issue 13, item 1): starts never
build or take the build lock, and a lock met anyway is named (age, holder or its absence), waited
on for a bounded time, then refused with an error saying what to delete; a lock nobody holds that
is older than any build is removed. Plus the end-of-suite orphan guard of tests/conftest.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import trainkit as tk
from mmpretrain import extensions as ext

OP = "deepspeed_shm_comm"  # what deepspeed.comm loads on CPU (deepspeed/comm/torch.py: build_shm_op)
VENV_EXT = Path(os.environ["TORCH_EXTENSIONS_DIR"])  # tests/conftest.py: <venv>/torch_extensions


def _plant(lock: Path, age_s: float = 0.0) -> Path:
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_bytes(b"")  # FileBaton writes nothing into its lock either
    if age_s:
        t = time.time() - age_s
        os.utime(lock, (t, t))
    return lock


def _copy_built(dst: Path, stamp: bool) -> Path:
    """This environment's built op (make install) in a private directory; with or without the stamp."""
    shutil.copytree(VENV_EXT / OP, dst / OP, symlinks=True, ignore=shutil.ignore_patterns("lock"))
    if stamp:
        shutil.copy2(VENV_EXT / ext.STAMP, dst / ext.STAMP)
    return dst


# ---- the lock check, in process ------------------------------------------------------------------


def test_unheld_lock_older_than_any_build_is_removed(tmp_path, capsys):
    lock = _plant(tmp_path / OP / "lock", age_s=ext.STALE_AFTER_S + 60)
    t0 = time.monotonic()
    ext.check_lock(lock, wait_s=30)
    assert time.monotonic() - t0 < 5 and not lock.exists()
    err = capsys.readouterr().err
    assert f"removed stale build lock {lock}" in err and "no process on this host has it open" in err


def test_lock_names_its_holder_and_the_wait_is_bounded(tmp_path, capsys):
    lock = _plant(tmp_path / OP / "lock", age_s=ext.STALE_AFTER_S + 60)  # old, but a live process holds it
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "print('open', flush=True); time.sleep(120)", str(lock)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"open"
        t0 = time.monotonic()
        with pytest.raises(ext.BuildLockError) as e:
            ext.check_lock(lock, wait_s=1.0)
        took = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    assert 1.0 <= took < 10, took
    msg = str(e.value)
    assert str(lock) in msg and f"pid {holder.pid}" in msg and f"rm {lock}" in msg and "age" in msg
    first = capsys.readouterr().err
    assert f"build lock {lock} exists" in first and f"pid {holder.pid}" in first and "waiting up to 1 s" in first
    assert lock.exists()  # a held lock is never removed


def test_wait_ends_when_the_lock_goes(tmp_path):
    lock = _plant(tmp_path / OP / "lock")
    threading.Timer(0.5, lock.unlink).start()
    t0 = time.monotonic()
    ext.check_lock(lock, wait_s=30)
    assert time.monotonic() - t0 < 10


# ---- through the CLI -----------------------------------------------------------------------------


def test_stale_lock_at_start_fails_fast_naming_it(tiny_data, tmp_path):
    """The original hang: a fresh extensions directory whose build was SIGKILLed holding the lock.
    Before: the start waited in FileBaton.wait() forever, printing nothing."""
    root = tmp_path / "ext"
    lock = _plant(root / OP / "lock")  # where torch.utils.cpp_extension takes it for DeepSpeed
    out, log = tmp_path / "run", tmp_path / "run.log"
    t0 = time.monotonic()
    rc = tk.run("single", 1, tk.tiny_overrides(out, tiny_data, "train.steps=1"), log, timeout=240,
                TORCH_EXTENSIONS_DIR=str(root), MMPRETRAIN_BUILD_LOCK_WAIT="3")
    took = time.monotonic() - t0
    text = log.read_text()
    assert rc != 0, text[-3000:]
    assert took < 120, took  # start-up + the 3 s wait, nowhere near a hang
    assert f"build lock {lock} exists (age" in text and "no process on this host has it open" in text, text[-3000:]
    assert "waiting up to 3 s" in text and "still exists after waiting 3 s" in text and f"rm {lock}" in text
    assert not list(root.rglob("*.so")), "nothing was built"


def test_built_ops_start_without_build_or_lock(tiny_data, tmp_path):
    """With the stamped `make install` build, a start loads the op straight from its .so: a lock
    planted in that directory is never even looked at, nothing is rebuilt."""
    root = _copy_built(tmp_path / "ext", stamp=True)
    lock = _plant(root / OP / "lock")
    so = root / OP / f"{OP}.so"
    before = so.stat().st_mtime_ns
    out, log = tmp_path / "run", tmp_path / "run.log"
    rc = tk.run("single", 1, tk.tiny_overrides(out, tiny_data, "train.steps=1"), log, timeout=240,
                TORCH_EXTENSIONS_DIR=str(root), MMPRETRAIN_BUILD_LOCK_WAIT="0")
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "build lock" not in text and lock.exists() and so.stat().st_mtime_ns == before


def test_old_unheld_lock_is_removed_and_the_start_goes_on(tiny_data, tmp_path):
    """No stamp (DeepSpeed's JIT path, ninja finds nothing to do) and a lock nobody holds, older than
    any build: removed with one line, and the run trains."""
    root = _copy_built(tmp_path / "ext", stamp=False)
    lock = _plant(root / OP / "lock", age_s=ext.STALE_AFTER_S + 60)
    out, log = tmp_path / "run", tmp_path / "run.log"
    rc = tk.run("single", 1, tk.tiny_overrides(out, tiny_data, "train.steps=1"), log, timeout=240,
                TORCH_EXTENSIONS_DIR=str(root), MMPRETRAIN_BUILD_LOCK_WAIT="0")
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert f"removed stale build lock {lock}" in text and not lock.exists()


# ---- the per-environment directory ---------------------------------------------------------------


def test_tests_use_the_directory_make_install_builds():
    made = subprocess.run(["make", "-s", "--no-print-directory", f"VENV={sys.prefix}", "--eval",
                           "print-ext-dir: ; @echo $(TORCH_EXTENSIONS_DIR)", "print-ext-dir"],
                          cwd=tk.REPO, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    make_dir = Path(made.stdout.strip())
    assert make_dir == Path(sys.prefix) / "torch_extensions" == ext.default_dir()
    assert Path(os.environ["TORCH_EXTENSIONS_DIR"]) == make_dir  # this process (conftest)
    assert Path(tk.env()["TORCH_EXTENSIONS_DIR"]) == make_dir  # the processes the tests start
    assert ext.built(make_dir), f"{make_dir} holds no stamped build: run `make install`"
    assert (make_dir / OP / f"{OP}.so").is_file()


# ---- the end-of-suite orphan guard (tests/conftest.py) ---------------------------------------------


def test_session_guard_kills_survivors_and_fails_the_run(tmp_path):
    pidfile = tmp_path / "pid"
    (tmp_path / "test_leak.py").write_text(
        "import subprocess, sys\n"
        "def test_leak():\n"
        "    p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', 'mmpretrain.train'],\n"
        "                         start_new_session=True)\n"
        f"    open({str(pidfile)!r}, 'w').write(str(p.pid))\n")
    env = dict(os.environ, PYTHONPATH=str(tk.REPO / "tests"))
    env.pop("MMPRETRAIN_TEST_SESSION")  # the inner session tags its own processes
    inner = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                            "--rootdir", str(tmp_path), str(tmp_path / "test_leak.py")],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    pid = int(pidfile.read_text())
    try:
        assert inner.returncode == pytest.ExitCode.TESTS_FAILED, inner.stdout[-3000:]
        assert "1 passed" in inner.stdout and "outlived it (killed now)" in inner.stdout
        assert f"pid {pid}:" in inner.stdout
        time.sleep(0.5)
        with open(f"/proc/{pid}/stat") as f:  # a zombie until its (gone) parent's reaper collects it
            assert f.read().split(") ")[1][0] in "ZX"
    except FileNotFoundError:
        pass  # already reaped: gone
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
