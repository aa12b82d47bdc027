"""Linear probe hygiene: the probe never trains on copies of the items it scores. The group split
keeps every group on one side; the suite trains on the config's train shards by default, falls back
to the group split, refuses when neither exists, and its report names the split with its counts."""
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from tiny import tiny_cfg  # noqa: E402

from mmpretrain.config import SourceConfig  # noqa: E402
from mmpretrain.data.demo import make_sample  # noqa: E402
from mmpretrain.data.samples import SampleProcessor, collate, parse_source  # noqa: E402
from mmpretrain.data.shards import RawSample  # noqa: E402
from mmpretrain.data.tokenizer import ByteTokenizer  # noqa: E402
from mmpretrain.eval.linear_probe import group_split, stratified_split  # noqa: E402

N_ITEMS = 16  # distinct eval items, each written twice (a repeat shares its group)


def _write(path: Path, keys: List[str], labels: List[int], groups: List[Optional[object]], seeds: List[int]) -> str:
    from webdataset import TarWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    with TarWriter(str(path), encoder=False, mtime=0.0) as tw:
        for key, y, g, s in zip(keys, labels, groups, seeds):
            sample = make_sample(key, y, np.random.default_rng(s), image_size=16, sample_rate=4000, clip_seconds=0.25,
                                 jpeg_share=0.0, wav_share=0.0)
            meta = json.loads(sample["json"])
            if g is not None:
                meta["group"] = g
            sample["json"] = json.dumps(meta).encode()
            tw.write(sample)
    (path.parent / "sizes.json").write_text(json.dumps({path.name: len(keys)}))
    return str(path)


def test_group_split_keeps_repeats_together():
    rng = np.random.default_rng(0)
    items = rng.integers(0, 4, 200)  # item i has label items[i]
    labels = np.repeat(items, 2)  # every item twice, with the same group
    groups = np.repeat(np.arange(200) * 7 + 3, 2)
    order = rng.permutation(400)  # copies scattered through the set
    labels, groups = labels[order], groups[order]
    groups[:10] = -1  # a few items have no group: on neither side
    tr, te = group_split(labels.tolist(), groups.tolist(), 0.5, seed=1)
    assert not set(groups[tr]) & set(groups[te])  # no group on both sides
    assert sorted(tr.tolist() + te.tolist()) == np.flatnonzero(groups >= 0).tolist()
    assert 150 <= len(te) <= 250 and set(labels[te]) == set(labels[tr]) == {0, 1, 2, 3}  # about half, every class
    tr2, te2 = group_split(labels.tolist(), groups.tolist(), 0.5, seed=1)
    assert np.array_equal(te, te2)
    # what the group split prevents: a split of the items puts copies on both sides
    s_tr, s_te = stratified_split(labels.tolist(), 0.5, seed=1)
    assert set(groups[s_tr][groups[s_tr] >= 0]) & set(groups[s_te])


def test_group_split_group_label_is_the_most_common():
    # group 5: labels 1,1,0 -> class 1; group 6: 0; group 7: 1; two groups per class, one to each side
    tr, te = group_split([1, 1, 0, 0, 1, 0], [5, 5, 5, 6, 7, 8], 0.5, seed=0)
    sides = {g: ("te" if i in te else "tr") for i, g in enumerate([5, 5, 5, 6, 7, 8])}
    assert sides[5] != sides[7] and sides[6] != sides[8]


def test_group_travels_with_the_batch():
    cfg = tiny_cfg()
    spec = parse_source(SourceConfig(urls="x"), 0)
    tok = ByteTokenizer()
    exs = []
    for key, meta in (("a", {"label": 1, "group": "clip-17"}), ("b", {"label": 2, "group": "clip-17"}),
                      ("c", {"label": 3, "group": 17}), ("d", {"label": 4})):
        raw = RawSample(key, "u", {"txt": b"a red circle", "json": json.dumps(meta).encode()})
        proc = SampleProcessor(cfg.data, tok, train=False)
        exs.append(proc.decode(proc.prepare(raw, spec), 0, (0,)))
    g = collate(exs, cfg.data, tok.pad_id).groups
    assert g.dtype == torch.long and g[0] == g[1] and g[0] >= 0 and g[2] >= 0 and g[2] != g[0] and g[3] == -1
    other = SampleProcessor(cfg.data, tok, train=False, group_key="label")  # another field
    raw = RawSample("e", "u", {"txt": b"x", "json": b'{"label": 1, "group": "clip-17"}'})
    assert other.prepare(raw, spec).group not in (-1, int(g[0]))


@pytest.fixture(scope="module")
def probe_env(tmp_path_factory):
    from mmpretrain.models import build_model

    root = tmp_path_factory.mktemp("probe")
    keys, labels, groups, seeds = [], [], [], []
    for i in range(N_ITEMS):
        for c in range(2):  # two byte-identical copies under different keys
            keys.append(f"it{i}_c{c}")
            labels.append(i % 4)
            groups.append(f"item-{i}")
            seeds.append(i)
    ev = _write(root / "eval" / "eval-000000.tar", keys, labels, groups, seeds)
    ev_nogroup = _write(root / "eval_ng" / "eval-000000.tar", keys, labels, [None] * len(keys), seeds)
    tr = _write(root / "train" / "train-000000.tar", [f"t{i}" for i in range(12)], [i % 4 for i in range(12)],
                [None] * 12, [1000 + i for i in range(12)])
    cfg = tiny_cfg("data.num_workers=0")
    torch.manual_seed(0)
    model = build_model(cfg, 259).eval()
    return {"root": root, "eval": ev, "eval_nogroup": ev_nogroup, "train": tr, "model": model}


def _probe(env, data, *overrides, **opts):
    from mmpretrain.eval.suite import EvalOptions, EvalSuite

    cfg = tiny_cfg("data.num_workers=0", *overrides)
    res = EvalSuite(env["model"], cfg, ByteTokenizer()).run(data, EvalOptions(tasks=("linear_probe",), batch_size=8,
                                                                              **opts))
    return res["linear_probe"]


def test_default_trains_on_the_config_train_shards(probe_env):
    rep = _probe(probe_env, probe_env["eval"], f"data.train=[{{name: tr, urls: '{probe_env['train']}'}}]")
    sp = rep["split"]
    assert sp["kind"] == "train_shards" and "data.train: tr" in sp["description"]
    assert sp["num_train"] == 12 and sp["num_test"] == 2 * N_ITEMS
    assert rep["image"]["num_train"] == 12 and rep["image"]["num_samples"] == 2 * N_ITEMS


def test_probe_train_cap_and_explicit_urls(probe_env):
    # --probe-train wins over data.train; eval.probe_train_max caps what it reads
    rep = _probe(probe_env, probe_env["eval"], f"data.train=[{{name: gone, urls: '{probe_env['root']}/nope.tar'}}]",
                 "eval.probe_train_max=9", probe_train_urls=probe_env["train"])
    assert rep["split"]["kind"] == "probe_train" and probe_env["train"] in rep["split"]["description"]
    assert rep["split"]["num_train"] == 9 and rep["image"]["num_train"] == 9


def test_group_split_without_train_shards(probe_env):
    # unreadable train shards: the eval items split by their json group, both copies on one side
    rep = _probe(probe_env, probe_env["eval"], f"data.train=[{{name: gone, urls: '{probe_env['root']}/nope.tar'}}]")
    sp = rep["split"]
    assert sp["kind"] == "group" and sp["group_key"] == "group" and "cannot be read" in sp["description"]
    assert sp["num_train"] + sp["num_test"] == 2 * N_ITEMS and sp["num_ungrouped"] == 0
    assert sp["num_groups_train"] + sp["num_groups_test"] == N_ITEMS  # no group counted on both sides
    assert sp["num_train"] == 2 * sp["num_groups_train"] and sp["num_test"] == 2 * sp["num_groups_test"]
    assert rep["image"]["num_samples"] == sp["num_test"]


def test_refused_when_neither_exists(probe_env):
    rep = _probe(probe_env, probe_env["eval_nogroup"], "data.train=[]")
    assert set(rep) == {"refused"}
    msg = rep["refused"]
    for part in ("--probe-train", "data.train", "--probe-group-key", "eval.probe_group_key", "json 'group'"):
        assert part in msg, part
    # the group key is configurable: the demo's json 'shape' field groups items too
    rep = _probe(probe_env, probe_env["eval_nogroup"], "data.train=[]", "eval.probe_group_key=shape")
    assert rep["split"]["kind"] == "group" and rep["split"]["group_key"] == "shape"


def test_config_refuses_bad_probe_keys():
    from mmpretrain.config import ConfigError

    with pytest.raises(ConfigError, match="eval.probe_train_max"):
        tiny_cfg("eval.probe_train_max=0")
    with pytest.raises(ConfigError, match="eval.probe_group_key"):
        tiny_cfg("eval.probe_group_key=' '")


def test_periodic_eval_probe_trains_on_the_train_shards(probe_env):
    from mmpretrain.eval.suite import EvalSuite

    cfg = tiny_cfg("data.num_workers=0", f"data.eval_urls={probe_env['eval']}", "eval.linear_probe=true",
                   "eval.zeroshot=false", "eval.captioning=false",
                   f"data.train=[{{name: tr, urls: '{probe_env['train']}'}}]")
    flat = EvalSuite(probe_env["model"], cfg, ByteTokenizer()).periodic()
    assert flat["linear_probe/split/num_train"] == 12 and flat["linear_probe/split/num_test"] == 2 * N_ITEMS
    assert flat["linear_probe/image/num_train"] == 12
