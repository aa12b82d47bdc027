"""(b) Ranks x workers see disjoint and complete epochs; eval sees each sample once."""
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shardkit import make_cfg, make_shards  # noqa: E402

from mmpretrain.data import build_eval_loader, build_train_loader, build_tokenizer  # noqa: E402

TOK = build_tokenizer("bytes")


def _epoch_keys(loaders, n_batches):
    """epoch -> list of keys over all loaders (ranks)."""
    per_epoch = {}
    for loader in loaders:
        for _ in range(n_batches):
            b = next(loader)
            for k, e in zip(b.keys, b.epochs):
                per_epoch.setdefault(e, []).append(k)
        loader.close()
    return per_epoch


def test_two_ranks_two_workers_disjoint_complete(tmp_path):
    url = make_shards(str(tmp_path), 3, [14, 10, 16], kind="it")  # 40 samples, uneven shards
    all_keys = {f"shard{s:02d}_{j:04d}" for s, n in enumerate([14, 10, 16]) for j in range(n)}
    cfg = make_cfg(url, workers=2, batch=4, image_size=8)
    cfg.model.vision.patch_size = 8
    loaders = [build_train_loader(cfg, r, 2, TOK) for r in (0, 1)]
    # 40 samples / 4 slots = 10 per slot per epoch = 20 per rank: 10 batches of 4 = 2 epochs per rank
    per_epoch = _epoch_keys(loaders, 10)
    for e in (0, 1):
        keys = per_epoch[e]
        assert len(keys) == len(set(keys)) == 40 and set(keys) == all_keys, e
    assert per_epoch[0] != per_epoch[1]  # reshuffled each epoch


def test_uneven_total_and_fewer_shards_than_slots(tmp_path):
    # 1 shard of 21 samples, 2 ranks x 2 workers: split by sample index; M = ceil(21/4) = 6
    url = make_shards(str(tmp_path), 1, 21, kind="at")
    cfg = make_cfg(url, workers=0, batch=3)
    per_epoch = _epoch_keys([build_train_loader(cfg, r, 4, TOK) for r in range(4)], 2)
    keys = per_epoch[0]
    assert len(keys) == 24 and len(set(keys)) == 21  # complete; 4*6-21 = 3 wrap-around repeats
    assert sum(c - 1 for c in Counter(keys).values()) == 3


def test_eval_each_sample_once(tmp_path):
    url = make_shards(str(tmp_path), 3, [5, 7, 6], kind="ita")
    cfg = make_cfg(url, workers=2)
    seen = []
    for r in range(2):
        for b in build_eval_loader(url, cfg, TOK, batch_size=4, rank=r, world_size=2):
            seen += b.keys
    assert len(seen) == 18 and len(set(seen)) == 18
    loader = build_eval_loader(url, cfg, TOK, 4)
    first = [k for b in loader for k in b.keys]
    assert first == [k for b in loader for k in b.keys] and len(first) == 18  # deterministic pass
    # no shuffle: each worker reads a contiguous range in shard order, batches alternate workers
    assert first[:4] == [f"shard00_{j:04d}" for j in range(4)] and loader.stats()["samples"] == 18


def test_pipe_urls_need_and_use_sizes(tmp_path):
    from mmpretrain.config import SourceConfig
    from mmpretrain.data.shards import ShardError

    make_shards(str(tmp_path), 2, 6, kind="it")
    url = f"pipe:cat {tmp_path}/shard-{{00000..00001}}.tar"
    cfg = make_cfg(url, workers=0, batch=4)
    cfg.data.train = [SourceConfig(name="p", urls=url)]
    try:
        build_train_loader(cfg, 0, 1, TOK)
        raise AssertionError("pipe without sizes accepted")
    except ShardError as e:
        assert "sizes" in str(e)
    cfg.data.train = [SourceConfig(name="p", urls=url, sizes=str(tmp_path / "sizes.json"))]
    per_epoch = _epoch_keys([build_train_loader(cfg, 0, 1, TOK)], 6)
    assert sorted(per_epoch[0]) == sorted(f"shard{s:02d}_{j:04d}" for s in range(2) for j in range(6))
