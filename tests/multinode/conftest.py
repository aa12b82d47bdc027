"""A 2-node cluster on this machine for the tests marked `multinode` (tests/multinode/cluster.sh):
network namespaces node1 and node2 joined by a veth pair, an sshd and a slurmd per node, slurmctld on
node1. Made once per session, torn down at its end (nothing left running); skipped, with the reason,
where it cannot be made (not root, no network namespaces, packages not installable)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, Iterator

import pytest

HERE = Path(__file__).resolve().parent
CLUSTER_DIR = os.environ.get("MMP_MN_DIR", "/tmp/mmpretrain-multinode")
SKIP_CODE = 77  # cluster.sh: "cannot be made here"


def cluster(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, MMP_MN_DIR=CLUSTER_DIR)
    return subprocess.run(["bash", str(HERE / "cluster.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def two_nodes() -> Iterator[Dict[str, str]]:
    """Bring the cluster up; yield what clients need: SLURM_CONF, the `ssh` wrapper dir (this
    cluster's keys, as a user's ~/.ssh/config would give them), the cluster dir."""
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("the 2-node test cluster needs root on Linux (network namespaces, sshd, slurmd)")
    proc = cluster("up")
    if proc.returncode == SKIP_CODE:
        pytest.skip("2-node test cluster cannot be made here: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
    if proc.returncode != 0:
        cluster("down", timeout=120)
        pytest.fail(f"cluster.sh up failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    try:
        yield {"SLURM_CONF": f"{CLUSTER_DIR}/slurm/etc/slurm.conf", "MMP_MN_DIR": CLUSTER_DIR,
               "bin": f"{CLUSTER_DIR}/bin"}
    finally:
        down = cluster("down", timeout=120)
        assert down.returncode == 0, down.stderr[-2000:]
