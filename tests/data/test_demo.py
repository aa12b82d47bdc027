"""Demo data set: layout, members, split disjointness, missing-modality share, and that the
audio pitch/timbre and image colour really encode the attributes. Reads tars with `tarfile`."""
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmpretrain.data import demo
from mmpretrain.data.demo import COLOURS, PITCH_HZ, RGB, SHAPES, label_of, make_demo_dataset

N_TRAIN, N_EVAL, SHARD = 96, 48, 40


def read_split(root: Path, split: str) -> dict:
    """{shard name: {key: {ext: bytes}}} from the split's tars."""
    out = {}
    for tar in sorted((root / split).glob("*.tar")):
        samples = {}
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
        out[tar.name] = samples
    return out


def flat(split_data: dict) -> dict:
    return {k: v for shard in split_data.values() for k, v in shard.items()}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(str(root), train=N_TRAIN, eval=N_EVAL, shard_size=SHARD, seed=3)
    return root


def test_layout_and_sizes(demo_dir):
    assert sorted(p.name for p in (demo_dir / "train").glob("*.tar")) == [f"train-{i:06d}.tar" for i in range(3)]
    assert sorted(p.name for p in (demo_dir / "eval").glob("*.tar")) == ["eval-000000.tar", "eval-000001.tar"]
    for split in ("train", "eval"):
        sizes = json.loads((demo_dir / split / "sizes.json").read_text())
        data = read_split(demo_dir, split)
        assert sizes == {name: len(samples) for name, samples in data.items()}
    assert json.loads((demo_dir / "train" / "sizes.json").read_text())["train-000002.tar"] == N_TRAIN - 2 * SHARD
    classes = json.loads((demo_dir / "classes.json").read_text())
    assert classes == [f"a {c} {s}" for s in SHAPES for c in COLOURS] and len(classes) == 16
    for lab, name in enumerate(classes):
        assert name == "a {1} {0}".format(*demo.attributes_of(lab))
    assert demo.shard_urls(str(demo_dir), "train").endswith("train/train-{000000..000002}.tar")


def test_members_and_json(demo_dir):
    for split in ("train", "eval"):
        samples = flat(read_split(demo_dir, split))
        assert len(samples) == {"train": N_TRAIN, "eval": N_EVAL}[split]
        for key, mem in samples.items():
            assert key.startswith(f"{split}_")
            meta = json.loads(mem["json"])
            assert meta["label"] == label_of(meta["shape"], meta["colour"]) == int(mem["cls"])
            assert meta["caption_image"] == f"a {meta['colour']} {meta['shape']}"
            assert demo.PITCH_WORD[meta["colour"]] in meta["caption_audio"]
            has = {"image": bool({"png", "jpg"} & set(mem)), "audio": bool({"flac", "wav"} & set(mem)),
                   "text": "txt" in mem}
            assert [m for m in demo.MODALITIES if has[m]] == meta["modalities"]
            assert set(mem) <= {"png", "jpg", "flac", "wav", "txt", "json", "cls"}
            if has["text"]:
                cap = mem["txt"].decode()
                assert cap == meta["caption"] and meta["colour"] in cap and meta["shape"] in cap
            else:
                assert "caption" not in meta
            if split == "eval":
                assert all(has.values()), key
    # both encodings of each modality occur
    exts = {e for mem in flat(read_split(demo_dir, "train")).values() for e in mem}
    assert {"png", "jpg", "flac", "wav"} <= exts


def test_missing_share_and_never_all(demo_dir):
    samples = flat(read_split(demo_dir, "train"))
    n_missing = [3 - len(json.loads(m["json"])["modalities"]) for m in samples.values()]
    assert max(n_missing) <= 1  # at most one modality dropped, never all
    share = sum(n_missing) / len(n_missing)
    assert 0.15 <= share <= 0.20
    assert share == pytest.approx(round(0.175 * N_TRAIN) / N_TRAIN)


def test_split_disjoint(demo_dir):
    train, ev = flat(read_split(demo_dir, "train")), flat(read_split(demo_dir, "eval"))
    assert not set(train) & set(ev)

    def digests(samples):
        return {hashlib.sha1(v).digest() for m in samples.values() for e, v in m.items() if e in ("png", "jpg", "flac", "wav")}

    assert not digests(train) & digests(ev)


def test_deterministic(demo_dir, tmp_path):
    make_demo_dataset(str(tmp_path / "a"), train=N_TRAIN, eval=N_EVAL, shard_size=SHARD, seed=3)
    for split, name in (("train", "train-000001.tar"), ("eval", "eval-000000.tar")):
        assert (tmp_path / "a" / split / name).read_bytes() == (demo_dir / split / name).read_bytes()
    make_demo_dataset(str(tmp_path / "b"), train=8, eval=4, shard_size=8, seed=4)
    assert (tmp_path / "b" / "train" / "train-000000.tar").read_bytes() != (demo_dir / "train" / "train-000000.tar").read_bytes()


def _audio_features(x: np.ndarray, sr: int):
    """(f0, |X(2 f0)|/|X(f0)|, |X(3 f0)|/|X(f0)|, share of quiet 10 ms frames inside the sound)."""
    n = len(x)
    spec = np.abs(np.fft.rfft(x * np.hanning(n)))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    f0 = freqs[np.argmax(spec)]

    def mag(f):
        band = (freqs > f * 0.97) & (freqs < f * 1.03)
        return spec[band].max() if band.any() else 0.0

    hop = sr // 100
    rms = np.sqrt(np.mean(x[: n // hop * hop].reshape(-1, hop) ** 2, axis=1))
    loud = np.nonzero(rms > 0.3 * rms.max())[0]
    gated = float(np.mean(rms[loud[0]: loud[-1] + 1] < 0.3 * rms.max()))
    return f0, mag(2 * f0) / mag(f0), mag(3 * f0) / mag(f0), gated


def _shape_from_audio(h2: float, h3: float, gated: float) -> str:
    if gated > 0.2:
        return "cross"  # pulsed beeps
    if h2 > 0.25:
        return "triangle"  # sawtooth: all harmonics, 1/n
    if h3 > 0.15:
        return "square"  # square wave: odd harmonics only
    return "circle"  # pure sine


def test_audio_encodes_attributes(demo_dir):
    for key, mem in flat(read_split(demo_dir, "eval")).items():
        meta = json.loads(mem["json"])
        data = mem.get("flac", mem.get("wav"))
        x, sr = sf.read(io.BytesIO(data), dtype="float32")
        assert sr == 16000 and x.shape == (16000,) and np.abs(x).max() <= 1.0
        f0, h2, h3, gated = _audio_features(x, sr)
        colour = min(PITCH_HZ, key=lambda c: abs(np.log(PITCH_HZ[c] / f0)))
        assert colour == meta["colour"], (key, f0)
        assert abs(f0 / PITCH_HZ[colour] - 1) < 0.05
        assert _shape_from_audio(h2, h3, gated) == meta["shape"], (key, h2, h3, gated)


def test_image_dominant_colour(demo_dir):
    for key, mem in flat(read_split(demo_dir, "eval")).items():
        meta = json.loads(mem["json"])
        img = np.asarray(Image.open(io.BytesIO(mem.get("png", mem.get("jpg")))).convert("RGB")).astype(np.float32)
        assert img.shape == (64, 64, 3)
        bright = img.max(axis=2) > 140  # the background is dark, the shape bright
        assert 0.02 < bright.mean() < 0.6, key
        rgb = np.median(img[bright], axis=0)
        colour = min(RGB, key=lambda c: np.sum((np.asarray(RGB[c]) - rgb) ** 2))
        assert colour == meta["colour"], (key, rgb)


def test_cli(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "make_demo_data.py"
    spec = importlib.util.spec_from_file_location("make_demo_data", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path), "--train", "10", "--eval", "5", "--shard-size", "4",
                     "--image-size", "32", "--sample-rate", "8000", "--clip-seconds", "0.5"]) == 0
    sizes = json.loads((tmp_path / "train" / "sizes.json").read_text())
    assert sizes == {"train-000000.tar": 4, "train-000001.tar": 4, "train-000002.tar": 2}
    mem = flat(read_split(tmp_path, "eval"))["eval_000000"]
    x, sr = sf.read(io.BytesIO(mem.get("flac", mem.get("wav"))))
    assert sr == 8000 and len(x) == 4000
    assert Image.open(io.BytesIO(mem.get("png", mem.get("jpg")))).size == (32, 32)
