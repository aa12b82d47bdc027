"""A real single-node SLURM cluster for the tests marked `slurm`: start_slurm.sh installs
(Debian packages) and starts munged/slurmctld/slurmd once per session; stop_slurm.sh stops them.
Skipped, with the reason, where that cannot work (not root, no apt-get, install failed)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterator

import pytest

HERE = Path(__file__).resolve().parent
SLURM_DIR = os.environ.get("MMP_SLURM_DIR", "/tmp/mmpretrain-slurm")
SKIP_CODE = 77  # start_slurm.sh: "cannot be started here"


def _covered_by_two_nodes() -> bool:
    """The 2-node cluster of tests/multinode can be made here (root, network namespaces): its SLURM
    tests preempt, requeue and resume jobs of both submit launchers across two nodes, which is this
    test's loop and more; MMP_SLURM_SINGLE=1 runs this one anyway."""
    if os.environ.get("MMP_SLURM_SINGLE") == "1" or shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "--net", "--uts", "true"], capture_output=True).returncode == 0


def _cannot_start() -> str:
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "SLURM test cluster needs Linux"
    if os.geteuid() != 0:
        return "SLURM test cluster needs root (it installs and runs munged, slurmctld, slurmd)"
    if _covered_by_two_nodes():
        return ("covered by tests/multinode (2-node SLURM: srun and torchrun jobs preempted or losing a node, "
                "requeued, resumed); MMP_SLURM_SINGLE=1 runs this single-node test too")
    if shutil.which("slurmctld", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None \
            and shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install it"
    return ""


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Dict[str, str]]:
    """Start the cluster (idempotent) and yield the environment clients need (SLURM_CONF, PATH)."""
    reason = _cannot_start()
    if reason:
        pytest.skip(reason)
    # the preemption test runs two 2-CPU jobs side by side; declare at least 4 CPUs even on a 1-2 core
    # machine (start_slurm.sh sets SlurmdParameters=config_overrides then)
    env = dict(os.environ, MMP_SLURM_DIR=SLURM_DIR,
               MMP_SLURM_CPUS=os.environ.get("MMP_SLURM_CPUS", str(max(4, len(os.sched_getaffinity(0))))))
    proc = subprocess.run(["bash", str(HERE / "start_slurm.sh")], env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode == SKIP_CODE:
        pytest.skip("SLURM cannot be started here: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
    if proc.returncode != 0:
        pytest.fail(f"start_slurm.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    client_env = {"SLURM_CONF": f"{SLURM_DIR}/etc/slurm.conf",
                  "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    try:
        yield client_env
    finally:
        subprocess.run(["bash", str(HERE / "stop_slurm.sh")], env=env, capture_output=True, timeout=120)
