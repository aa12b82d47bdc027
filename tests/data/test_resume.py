"""(c) Exact resume from state_dict (epoch and resampled modes, with DataLoader workers,
across epoch boundaries), at a cost that does not grow with the position in the epoch."""
import json
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from faultkit import io_counters  # noqa: E402  (tests/, on sys.path through tests/conftest.py)
from shardkit import make_cfg, make_shards  # noqa: E402

from mmpretrain.data import build_train_loader, build_tokenizer  # noqa: E402
from mmpretrain.data.samples import SampleProcessor  # noqa: E402

TOK = build_tokenizer("bytes")


def _run(loader, n):
    out = []
    for _ in range(n):
        b = next(loader)
        out.append((b.keys, b.epochs, b.inputs["image"].clone(), b.inputs["audio"].clone()))
    return out


def _same(a, b):
    assert [x[0] for x in a] == [x[0] for x in b]
    assert [x[1] for x in a] == [x[1] for x in b]
    for x, y in zip(a, b):  # augmentation is seeded by stream position: identical pixels
        assert torch.equal(x[2], y[2]) and torch.equal(x[3], y[3])


@pytest.mark.parametrize("resampled,workers", [(False, 2), (True, 2), (False, 0)])
def test_resume_identical(tmp_path, resampled, workers):
    url = make_shards(str(tmp_path), 3, [9, 7, 8], kind="ita")  # 24 samples
    cfg = make_cfg(url, workers=workers, batch=5, buffer=6, resampled=resampled, seed=3)
    total = 16  # per rank (2 ranks): 12 samples per epoch -> ~6.7 epochs worth of batches
    ref_loader = build_train_loader(cfg, 1, 2, TOK)
    ref = _run(ref_loader, total)
    ref_loader.close()
    if not resampled:
        assert len({e for x in ref for e in x[1]}) >= 3  # crosses epoch boundaries
    stop = random.Random(7 + workers).randint(3, total - 4)
    first = build_train_loader(cfg, 1, 2, TOK)
    head = _run(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # JSON round trip
    _run(first, 1)  # consumed after the snapshot: must be re-produced after resume
    first.close()
    resumed = build_train_loader(cfg, 1, 2, TOK)
    resumed.load_state_dict(state)
    _same(head + _run(resumed, total - stop), ref)
    assert resumed.stats()["samples"] == total * 5
    resumed.close()


def test_resume_cost_bounded(tmp_path, monkeypatch):
    url = make_shards(str(tmp_path), 4, 50, kind="it")  # 200 samples
    cfg = make_cfg(url, workers=0, batch=4, buffer=8)
    decoded = []
    orig = SampleProcessor.decode
    monkeypatch.setattr(SampleProcessor, "decode", lambda self, *a: decoded.append(1) or orig(self, *a))
    costs = {}
    for frac in (0.1, 0.9):
        loader = build_train_loader(cfg, 0, 1, TOK)
        _run(loader, int(frac * 50) + 1)  # 50 batches of 4 per epoch
        state = loader.state_dict()
        expect = _run(loader, 1)[0][0]
        resumed = build_train_loader(cfg, 0, 1, TOK)
        resumed.load_state_dict(state)
        decoded.clear()
        with io_counters() as io:  # shard I/O of this process (workers=0) from here on
            assert next(resumed).keys == expect
        costs[frac] = (io, len(decoded))
    total_bytes = sum(os.path.getsize(tmp_path / f"shard-{i:05d}.tar") for i in range(4))
    for frac, (io, n_dec) in costs.items():
        assert n_dec == 4, (frac, n_dec)  # only the batch itself is decoded
        assert io["opens"] >= 1 and io["samples"] >= 4 and io["bytes"] > 0, (frac, io)  # the probes saw the reads
        assert io["samples"] <= cfg.data.shuffle_buffer + 4, (frac, io)  # at most one window re-read
        assert io["bytes"] < 0.1 * total_bytes, (frac, io, total_bytes)  # headers of one shard + a window
    assert costs[0.9][0]["bytes"] < 3 * costs[0.1][0]["bytes"], costs
