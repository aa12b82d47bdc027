"""tools/make_shards.py and tools/inspect_shards.py on real files: a folder tree and a CSV
manifest become shards with sizes.json and canonical-rate mono audio that the training
pipeline reads; the inspector counts modalities, durations, image sizes and decode errors."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, str(REPO / "tools" / name), *args], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def _members(shard: Path) -> dict:
    out: dict = {}
    with tarfile.open(shard) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def _tree(root: Path) -> None:
    """10 samples: png (varied sizes) + 44.1 kHz stereo wav (0.5-1.4 s) + txt; 2 text-only;
    one with a broken png."""
    rng = np.random.default_rng(0)
    for i in range(10):
        d = root / f"part{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20 + i, 30 + 2 * i, 3), dtype=np.uint8)).save(d / f"s{i}.png")
        n = int(44100 * (0.5 + 0.1 * i))
        sf.write(d / f"s{i}.wav", rng.uniform(-0.5, 0.5, (n, 2)).astype(np.float32), 44100)
        (d / f"s{i}.txt").write_text(f"caption {i}")
    for i in (10, 11):
        (root / f"t{i}.txt").write_text(f"text only {i}")
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "bad.txt").write_text("broken image")


def test_folder_tree_to_shards_and_inspect(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "shards"
    _tree(src)
    res = _tool("make_shards.py", "--input", str(src), "--out", str(out), "--max-count", "5")
    assert "wrote 13 samples in 3 shards" in res.stdout
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 5, "shard-000001.tar": 5, "shard-000002.tar": 3}
    samples = {}
    for name in sizes:
        samples.update(_members(out / name))
    assert len(samples) == 13
    s3 = samples["part1__s3"]
    assert set(s3) == {"png", "flac", "txt"} and s3["txt"] == b"caption 3"
    audio, rate = sf.read(io.BytesIO(s3["flac"]))
    assert rate == 16000 and audio.ndim == 1 and abs(len(audio) / rate - 0.8) < 0.01  # resampled, mono, same length
    assert set(samples["t10"]) == {"txt"}

    rep = json.loads(_tool("inspect_shards.py", str(out / "shard-{000000..000002}.tar"), "--json").stdout)
    assert rep["shards"] == 3 and rep["counts"]["samples"] == 13
    assert rep["counts"]["image+audio+text"] == 10 and rep["counts"]["text"] == 2
    assert rep["errors"] == {"image_decode": 1}
    assert abs(rep["audio_seconds"]["min"] - 0.5) < 0.01
    assert abs(rep["audio_seconds"]["max"] - 1.4) < 0.01
    assert rep["image_size"]["min"] == [30, 20] and rep["image_size"]["max"] == [48, 29]

    # the training pipeline reads them: every good sample once, the broken image skipped and counted
    from mmpretrain.config import load_config
    from mmpretrain.data.pipeline import EvalLoader
    from mmpretrain.data.tokenizer import ByteTokenizer

    cfg = load_config(str(REPO / "configs/demo.yaml"), ["data.num_workers=0", "data.image_size=32",
                                                        "data.audio.clip_seconds=0.5"])
    loader = EvalLoader(str(out / "shard-{000000..000002}.tar"), cfg, ByteTokenizer(), batch_size=4)
    keys = [k for b in loader for k in b.keys]
    assert sorted(keys) == sorted(k for k in samples if k != "bad")
    assert loader.stats()["skipped"] == {"eval": {"image_decode": 1}}


def test_manifest_with_labels_and_modality_captions(tmp_path):
    rng = np.random.default_rng(1)
    rows = ["image,audio,caption,caption_audio,label"]
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
        sf.write(tmp_path / f"{i}.flac", rng.uniform(-0.5, 0.5, 8000).astype(np.float32), 8000)
        rows.append(f"{i}.jpg,{i}.flac,a photo {i},a sound {i},{i % 2}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "shards"
    _tool("make_shards.py", "--manifest", str(tmp_path / "m.csv"), "--out", str(out), "--max-size", "1")
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 4}
    samples = _members(out / "shard-000000.tar")
    meta = json.loads(samples["000000002"]["json"])
    assert meta == {"caption": "a photo 2", "caption_audio": "a sound 2", "label": 0}
    assert set(samples["000000002"]) == {"jpg", "flac", "json"}
    _, rate = sf.read(io.BytesIO(samples["000000002"]["flac"]))
    assert rate == 16000
