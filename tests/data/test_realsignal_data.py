"""The real-signal benchmark's data (tools/make_realsignal_data.py): real scans and espeak-ng speech,
test voices and scans never in training, labels that match the spoken word, captions as lists."""
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools"))
import make_realsignal_data as rs  # noqa: E402


@pytest.fixture(scope="module")
def rs_dir(tmp_path_factory):
    try:
        rs.ensure_espeak()  # installs Debian's espeak-ng when root with apt-get, as the tool does
    except SystemExit as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("rs")
    rs.make_realsignal(str(root), train=60, train_clips=3, test_clips=2, test_images=3, shard_size=25, seed=1)
    return root


def _samples(root: Path, split: str) -> dict:
    out = {}
    for tar in sorted((root / split).glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def test_voices_and_scans_disjoint(rs_dir):
    voices = json.loads((rs_dir / "voices.json").read_text())
    assert voices["train"] and voices["test"] and not set(voices["train"]) & set(voices["test"])
    train, ev = _samples(rs_dir, "train"), _samples(rs_dir, "eval")
    assert len(train) == 60 and len(ev) == 30  # 3 held-out scans x 10 digits, each once
    variant = lambda s: json.loads(s["json"])["voice"].split()[0].split("+", 1)[1]  # noqa: E731
    assert {variant(s) for s in ev.values()} <= set(voices["test"])
    assert {variant(s) for s in train.values() if "flac" in s} <= set(voices["train"])
    assert not {s["png"] for s in ev.values()} & {s["png"] for s in train.values() if "png" in s}


def test_members_labels_and_captions(rs_dir):
    classes = json.loads((rs_dir / "classes.json").read_text())
    assert classes == rs.WORDS
    for split in ("train", "eval"):
        for key, s in _samples(rs_dir, split).items():
            meta = json.loads(s["json"])
            d = meta["label"]
            if split == "train":  # lists of templates, the loader draws one per step
                assert isinstance(meta["caption"], list) and len(meta["caption"]) == len(rs.TEXT)
                assert all(rs.WORDS[d] in c or str(d) in c for c in meta["caption"] + meta["caption_audio"])
            else:
                assert isinstance(meta["caption"], str) and rs.WORDS[d] in meta["caption"]
            if "png" in s:
                img = np.asarray(Image.open(io.BytesIO(s["png"])))
                assert img.shape == (32, 32, 3) and img.min() < 100 < img.max()  # ink on paper
            if "flac" in s:
                x, rate = sf.read(io.BytesIO(s["flac"]))
                assert rate == 16000 and 0.1 < len(x) / rate < 1.5 and np.abs(x).max() > 0.05


def test_spoken_word_differs_by_digit(rs_dir):
    """Same voice settings, different words -> different sounds; same word -> the same clip."""
    exe = rs.ensure_espeak()
    a = rs.speak(exe, "seven", "en-us+m3", 50, 160, 16000)
    b = rs.speak(exe, "seven", "en-us+m3", 50, 160, 16000)
    c = rs.speak(exe, "two", "en-us+m3", 50, 160, 16000)
    assert np.array_equal(a, b) and len(a) != len(c)
