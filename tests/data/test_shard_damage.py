"""Issue 13 item 10: damage inside shards is counted, never silent, and the inspector
(tools/inspect_shards.py) counts it exactly as the training loader does: a tar cut mid-member
(tar_truncated), a sample with a duplicated member (only that sample: duplicate_member, the rest
of the shard is read on), a 50000x50000 PNG header (image_too_large) and a shard that is not a
tar (not_a_tar, logged with its path; alone: an error naming the file)."""
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shardkit import image_bytes, kinds_sample, make_cfg, write_tar  # noqa: E402

from mmpretrain.config import SourceConfig  # noqa: E402
from mmpretrain.data import DataError, build_eval_loader, build_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TOK = build_tokenizer("bytes")


def _huge_png_header(w=50000, h=50000) -> bytes:
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _damaged(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    cut = root / "d-0.tar"  # 10 samples, cut inside sample 6: 6 good + 1 truncated position
    write_tar(str(cut), [kinds_sample(f"t{j}", j, "it") for j in range(10)])
    with tarfile.open(cut) as tf:
        m = next(m for m in tf.getmembers() if m.name.startswith("t6."))
    with open(cut, "r+b") as f:
        f.truncate(m.offset_data + m.size // 2)
    # 121 samples; sample 40 holds its png twice: only it is lost, the other 120 are read
    dup = root / "d-1.tar"
    with tarfile.open(dup, "w") as tf:
        for j in range(121):
            s = kinds_sample(f"u{j:03d}", 0, "it")
            items = [(e, b) for e, b in s.items() if e != "__key__"]
            if j == 40:
                items.append(("png", image_bytes((1, 2, 3))))
            for ext, data in items:
                info = tarfile.TarInfo(f"u{j:03d}.{ext}")
                info.size = len(data)
                import io
                tf.addfile(info, io.BytesIO(data))
    write_tar(str(root / "d-2.tar"), [{"__key__": "bomb", "png": _huge_png_header(), "txt": b"huge"},
                                      {"__key__": "fine", "png": image_bytes(), "txt": b"ok"}])
    (root / "d-3.tar").write_bytes(b"<html>not a tar at all</html>\n" * 40)
    return str(root / "d-{0..3}.tar")


def test_inspector_counts_equal_training_loader(tmp_path, caplog):
    url = _damaged(tmp_path / "s")
    res = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_shards.py"), url, "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads(res.stdout)
    want = {"tar_truncated": 1, "duplicate_member": 1, "image_too_large": 1, "not_a_tar": 1}
    assert rep["errors"] == want, rep
    assert rep["sizes"] == {"d-0.tar": 7, "d-1.tar": 121, "d-2.tar": 2, "d-3.tar": 1}
    assert set(rep["damaged_shards"]) == {"d-0.tar", "d-1.tar", "d-3.tar"}

    cfg = make_cfg(url, workers=0)
    cfg.data.max_error_rate = 1.0
    with caplog.at_level("WARNING"):
        loader = build_eval_loader(url, cfg, TOK, batch_size=8, source=SourceConfig(name="x", urls=url))
    keys = [k for b in loader for k in b.keys]
    st = loader.stats()
    assert st["skipped"]["eval"] == rep["errors"]
    assert len(keys) == 6 + 120 + 1 and "u040" not in keys and "u120" in keys
    assert any("d-3.tar" in r.getMessage() and "not a tar" in r.getMessage() for r in caplog.records)


def test_a_source_of_only_bad_shards_names_the_file(tmp_path):
    bad = tmp_path / "only.tar"
    bad.write_bytes(b"\x1f\x8b\x08\x00" + b"\0" * 100)
    cfg = make_cfg(str(bad))
    with pytest.raises(DataError, match=r"shard '.*only\.tar' is gzip-compressed"):
        build_eval_loader(str(bad), cfg, TOK, batch_size=2, source=SourceConfig(name="x", urls=str(bad)))


@pytest.mark.parametrize("name", ["a.jpg", "dir/a.b.c.txt", "x/y.z/k.flac", "noext", ".hidden.txt", "a.", "dir/.x",
                                  "a.b/c", "s0001.json", "deep/er/key.depth.png"])
def test_member_split_is_webdatasets(name):
    """shards._split keeps webdataset's key / extension rule without importing it (and torch)."""
    from webdataset.tariterators import base_plus_ext

    from mmpretrain.data.shards import _split

    key, ext = base_plus_ext(name)
    assert _split(name) == (key, ext.lower() if ext else ext)
