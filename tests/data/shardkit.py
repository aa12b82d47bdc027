"""Tiny synthetic WebDataset shards for the data tests (png, jpg, flac, wav, txt, json)."""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Dict, List, Optional

import numpy as np
import soundfile as sf
from PIL import Image

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def image_bytes(color=(255, 0, 0), size=(24, 20), fmt="png") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt.upper().replace("JPG", "JPEG"))
    return buf.getvalue()


def tone_bytes(freq: float = 440.0, rate: int = 16000, seconds: float = 0.5, fmt: str = "flac") -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format=fmt.upper())
    return buf.getvalue()


def write_tar(path: str, samples: List[Dict[str, bytes]]) -> None:
    """samples: dicts with '__key__' and ext -> bytes; written in order."""
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def kinds_sample(key: str, i: int, kind: str) -> Dict[str, bytes]:
    """kind: 'it' image-text, 'at' audio-text, 'ita' all three; rotates png/jpg, flac/wav, txt/json."""
    s: Dict[str, bytes] = {"__key__": key}
    if "i" in kind:
        s["png" if i % 2 == 0 else "jpg"] = image_bytes(COLORS[i % 4], fmt="png" if i % 2 == 0 else "jpg")
    if "a" in kind:
        s["flac" if i % 2 == 0 else "wav"] = tone_bytes(200.0 + 100 * (i % 4), fmt="flac" if i % 2 == 0 else "wav")
    if i % 2 == 0:
        s["txt"] = f"caption {key}".encode()
    else:
        s["json"] = json.dumps({"caption": f"caption {key}", "label": i % 5}).encode()
    return s


def make_shards(root: str, n_shards: int, per_shard, kind: str = "it", prefix: str = "shard",
                sizes: bool = True) -> str:
    """Writes root/prefix-00000.tar...; returns the brace url. per_shard: int or list."""
    os.makedirs(root, exist_ok=True)
    counts = per_shard if isinstance(per_shard, list) else [per_shard] * n_shards
    table, i = {}, 0
    for s, n in enumerate(counts):
        name = f"{prefix}-{s:05d}.tar"
        write_tar(os.path.join(root, name), [kinds_sample(f"{prefix}{s:02d}_{j:04d}", i + j, kind) for j in range(n)])
        table[name] = n
        i += n
    if sizes:
        with open(os.path.join(root, "sizes.json"), "w") as f:
            json.dump(table, f)
    return os.path.join(root, f"{prefix}-{{00000..{n_shards - 1:05d}}}.tar")


def make_cfg(urls, *, batch: int = 4, workers: int = 0, buffer: int = 8, resampled: bool = False,
             image_size: int = 16, seed: int = 0, sources: Optional[list] = None):
    from mmpretrain.config import Config, SourceConfig

    cfg = Config()
    cfg.data.train = sources or [SourceConfig(name="s0", urls=urls)]
    cfg.data.num_workers = workers
    cfg.data.image_size = image_size
    cfg.data.shuffle_buffer = buffer
    cfg.data.resampled = resampled
    cfg.data.audio.sample_rate = 8000
    cfg.data.audio.clip_seconds = 0.25
    cfg.data.text_max_len = 24
    cfg.train.micro_batch_size = batch
    cfg.run.seed = seed
    return cfg
