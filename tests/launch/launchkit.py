"""Helpers shared by the launcher and SLURM tests: tiny demo shards, overrides, free ports."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "tiny_test.yaml"


def make_tiny_data(out: Path) -> Path:
    """128 train samples in 4 shards (32x32 images, 0.25 s audio); about a second to write."""
    from mmpretrain.data.demo import make_demo_dataset

    make_demo_dataset(str(out), train=128, eval=16, shard_size=32, image_size=32, clip_seconds=0.25)
    return out


def tiny_overrides(data: Path, output_dir: Path) -> List[str]:
    """Point configs/tiny_test.yaml at the tiny shards and a run directory."""
    return [f"run.output_dir={output_dir}",
            f"data.train=[{{name: demo, urls: '{data}/train/train-{{000000..000003}}.tar'}}]"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
