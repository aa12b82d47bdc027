"""glibc keeps freed host memory: a tensor freed and allocated again the next step is not
page-faulted in again (mmpretrain.host_malloc)."""
import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# each step allocates and frees three 64 MiB tensors, as a step's activations are (above glibc's
# largest mmap threshold, 32 MiB, so each is mmap'd and faulted in again by default)
PROBE = r"""
import json, resource, sys
import torch
if sys.argv[1] == "tuned":
    from mmpretrain.host_malloc import keep_freed_memory
    print(keep_freed_memory(), file=sys.stderr)
def step():
    a = torch.ones(16 << 20)  # 64 MiB, written
    b = a * 2
    c = b + a
    return float(c[::4096].sum())
for _ in range(10):  # the heap reaches its working size (small blocks between the big ones fragment it at first)
    step()
per_step = []
for _ in range(9):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
# the median step: a rare step that grows the heap once more (seen under a loaded machine: one 64 MiB
# block in 5 steps) is not the steady state this is about
print(json.dumps({"faults_per_step": sorted(per_step)[len(per_step) // 2]}))
"""


def _faults(mode: str, env_extra: dict = None) -> float:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **(env_extra or {}))
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["faults_per_step"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_freed_tensors_are_reused_without_page_faults():
    pages = 3 * (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    default, tuned = _faults("default"), _faults("tuned")
    assert default > 0.5 * pages, f"glibc defaults should fault the 64 MiB block in each step: {default}"
    assert tuned < 0.01 * pages, f"tuned malloc still faults {tuned} pages per step ({pages} per step by default)"


def test_preloaded_allocator_is_left_alone(monkeypatch):
    from mmpretrain import host_malloc

    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert "jemalloc preloaded" in host_malloc.keep_freed_memory()


def test_config_switch_is_a_bool():
    from mmpretrain.config import ConfigError, load_config

    assert load_config(None, ["train.keep_host_memory=false"]).train.keep_host_memory is False
    with pytest.raises(ConfigError, match="keep_host_memory"):
        load_config(None, ["train.keep_host_memory=sometimes"])
