"""Shared test set-up. Kernel tests run Triton in interpreter mode when no GPU is present;
the variable must be set before anything imports triton (deepspeed may)."""
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import List, Tuple

if "TRITON_INTERPRET" not in os.environ:
    try:
        import ctypes.util

        _has_cuda = ctypes.util.find_library("cuda") is not None
    except Exception:  # pragma: no cover
        _has_cuda = False
    if not _has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed's ops from this environment's directory, the one `make install` builds (the Makefile
# exports the same path): no test run builds, or waits on a build lock, on the training path
os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
# every process the suite starts inherits this tag; pytest_sessionfinish kills and reports any
# mmpretrain process of this session still alive (other sessions' processes carry other tags)
SESSION_TAG = "MMPRETRAIN_TEST_SESSION"
os.environ[SESSION_TAG] = uuid.uuid4().hex

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/trainkit.py

import pytest  # noqa: E402


def pytest_sessionstart(session):
    """Build the ops once here if this venv was not set up by `make install` (CI runs it first)."""
    from mmpretrain import extensions

    if not extensions.built(os.environ["TORCH_EXTENSIONS_DIR"]):
        print(f"\nbuilding DeepSpeed ops into {os.environ['TORCH_EXTENSIONS_DIR']} (make install does this)",
              file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "mmpretrain.extensions", "--build"], check=True, timeout=1200)


def session_processes(tag: str) -> List[Tuple[int, str]]:
    """(pid, command line) of every live mmpretrain process started under this session's tag."""
    needle = f"{SESSION_TAG}={tag}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone, or not ours to read
            continue
        if "mmpretrain" in cmd:
            found.append((int(pid), cmd))
    return found


def pytest_sessionfinish(session, exitstatus):
    """No test may leave a process behind: kill this session's survivors and fail the run."""
    tag = os.environ.get(SESSION_TAG)
    left = session_processes(tag) if tag else []
    deadline = time.monotonic() + 5  # a process killed by the last test may still be exiting
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = session_processes(tag)
    if not left:
        return
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lines = "\n".join(f"  pid {pid}: {cmd[:300]}" for pid, cmd in left)
    msg = f"\n{len(left)} process(es) started by this test session outlived it (killed now):\n{lines}\n"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(msg, red=True)
    else:
        print(msg, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Tiny demo shards shared by every test that runs real training processes."""
    import trainkit

    return trainkit.make_tiny_data(tmp_path_factory.mktemp("tiny_data"))
