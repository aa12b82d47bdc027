"""(d) Every kind of bad input is skipped and counted per reason and source; the
error-rate ceiling raises naming the shard."""
import json
import math
import os
import sys
import tarfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shardkit import image_bytes, kinds_sample, make_cfg, make_shards, tone_bytes, write_tar  # noqa: E402

from mmpretrain.config import SourceConfig  # noqa: E402
from mmpretrain.data import DataError, build_eval_loader, build_train_loader, build_tokenizer  # noqa: E402

TOK = build_tokenizer("bytes")
EXPECTED = {"tar_truncated": 4, "image_decode": 2, "audio_decode": 1, "text_decode": 2, "missing_text": 1,
            "empty": 1, "image_too_large": 1}


def _corrupt_set(root):
    os.makedirs(root, exist_ok=True)
    # shard 0: 10 samples per sizes.json, cut inside sample 6 -> 6 readable, 4 lost
    p0 = os.path.join(root, "corrupt-00000.tar")
    write_tar(p0, [kinds_sample(f"t{j}", j, "it") for j in range(10)])
    with tarfile.open(p0) as tf:
        m = next(m for m in tf.getmembers() if m.name.startswith("t6."))
    with open(p0, "r+b") as f:
        f.truncate(m.offset_data + m.size // 2)
    png = image_bytes()
    bad = [
        {"__key__": "good1", "png": png, "txt": b"fine"},
        {"__key__": "bad_img", "jpg": b"\xff\xd8 not a jpeg", "txt": b"x"},
        {"__key__": "cut_png", "png": png[: len(png) // 2], "txt": b"x"},
        {"__key__": "bad_aud", "flac": b"fLaC garbage", "txt": b"x"},
        {"__key__": "bad_txt", "png": png, "txt": b"\xff\xfe\xfa caption"},
        {"__key__": "bad_json", "png": png, "json": b"{not json"},
        {"__key__": "no_text", "png": png},
        {"__key__": "empty", "xyz": b"nothing we know"},
        {"__key__": "bomb", "png": image_bytes(size=(200, 200)), "txt": b"huge"},
        {"__key__": "good2", "wav": tone_bytes(fmt="wav"), "json": json.dumps({"caption": "ok"}).encode()},
    ]
    write_tar(os.path.join(root, "corrupt-00001.tar"), bad)
    with open(os.path.join(root, "sizes.json"), "w") as f:
        json.dump({"corrupt-00000.tar": 10, "corrupt-00001.tar": 10}, f)
    return os.path.join(root, "corrupt-{00000..00001}.tar")


def test_bad_input_counted_exactly(tmp_path):
    url = _corrupt_set(str(tmp_path))
    cfg = make_cfg(url, workers=2)
    cfg.data.max_image_pixels = 10_000
    cfg.data.max_error_rate = 1.0
    src = SourceConfig(name="x", urls=url, required="text")
    loader = build_eval_loader(url, cfg, TOK, batch_size=3, source=src)
    keys = [k for b in loader for k in b.keys]
    assert sorted(keys) == sorted([f"t{j}" for j in range(6)] + ["good1", "good2"])
    st = loader.stats()
    assert st["skipped"]["eval"] == EXPECTED and st["samples"] == 8 and st["seen"]["eval"] == 20


def test_train_loader_counts_per_source(tmp_path):
    url = _corrupt_set(str(tmp_path / "bad"))
    clean = make_shards(str(tmp_path / "clean"), 1, 6, kind="at")
    cfg = make_cfg(url, workers=0, batch=8, buffer=4)
    cfg.data.train = [SourceConfig(name="bad", urls=url, required="text"), SourceConfig(name="ok", urls=clean)]
    cfg.data.max_image_pixels = 10_000
    cfg.data.max_error_rate = 1.0
    loader = build_train_loader(cfg, 0, 1, TOK)
    for _ in range(8):
        next(loader)
    st = loader.stats()
    assert st["skipped"]["ok"] == {} and st["per_source"]["ok"] == st["seen"]["ok"]
    bad = st["skipped"]["bad"]
    # 20 raw samples per epoch of "bad", 8 good: skips = whole epochs' worth plus a partial one
    epochs_done = st["per_source"]["bad"] // 8
    for reason, n in EXPECTED.items():
        assert epochs_done * n <= bad[reason] <= (epochs_done + 1) * n, (reason, bad, epochs_done)
    assert sum(bad.values()) == st["seen"]["bad"] - st["per_source"]["bad"]
    assert st["samples"] == 64


def test_error_rate_ceiling_names_shard(tmp_path):
    url = _corrupt_set(str(tmp_path))
    cfg = make_cfg(url, workers=2, batch=4)
    cfg.data.train = [SourceConfig(name="bad", urls=str(tmp_path / "corrupt-00001.tar"))]
    cfg.data.max_error_rate = 0.3
    cfg.data.min_samples_for_error_rate = 4
    loader = build_train_loader(cfg, 0, 1, TOK)
    with pytest.raises(DataError, match=r"source 'bad'.*corrupt-00001\.tar"):
        for _ in range(10):
            next(loader)
    loader.close()


@pytest.mark.distributed
def test_training_on_every_corruption_runs_to_the_end_with_exact_counts(tmp_path, tiny_data):
    """(c) the trainer itself: a corrupt source mixed with a clean one trains every step, and
    metrics.jsonl carries the skip counts per reason and source."""
    import trainkit as tk

    bad = _corrupt_set(str(tmp_path / "bad"))
    out, log = tmp_path / "run", tmp_path / "run.log"
    clean = f"{tiny_data}/train/train-{{000000..000003}}.tar"
    over = tk.tiny_overrides(out, tiny_data, "train.steps=6", "train.log_every=3", "data.max_error_rate=1.0",
                             "data.max_image_pixels=10000",
                             f"data.train=[{{name: bad, urls: '{bad}', required: text, weight: 1}},"
                             f" {{name: ok, urls: '{clean}', weight: 1}}]")
    assert tk.run("single", 1, over, log) == 0, log.read_text()[-3000:]
    rows = tk.train_rows(out)
    assert [r["step"] for r in rows] == [3, 6]
    last = rows[-1]
    skipped, seen, used = last["data/skipped"], last["data/seen"], last["data/per_source"]
    assert skipped["ok"] == {} and used["bad"] > 0 and used["ok"] > 0
    assert sum(skipped["bad"].values()) == seen["bad"] - used["bad"]  # every sample read is used or counted
    # every kind of corruption was met and counted under its own reason (the shuffle buffer and the
    # worker read ahead, so per-pass exactness is the loader tests' job, with a small buffer)
    assert set(skipped["bad"]) == set(EXPECTED), skipped
    assert skipped["bad"]["tar_truncated"] % 4 == 0  # each pass over the cut shard loses exactly its last 4
    assert all(v > 0 and math.isfinite(v) for v in (last["loss"], last["grad_norm"]))
