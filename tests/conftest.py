"""Shared test set-up. Kernel tests run Triton in interpreter mode when no GPU is present;
the variable must be set before anything imports triton (deepspeed may)."""
import os
import sys

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/trainkit.py

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Tiny demo shards shared by every test that runs real training processes."""
    import trainkit

    return trainkit.make_tiny_data(tmp_path_factory.mktemp("tiny_data"))
