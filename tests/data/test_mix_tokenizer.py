"""(e) Weighted source mixing, refusal of mismatched resume states, tokenizer round trips."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shardkit import make_cfg, make_shards  # noqa: E402

from mmpretrain.config import SourceConfig  # noqa: E402
from mmpretrain.data import DataError, build_train_loader, build_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import train_tokenizer  # noqa: E402

TOK = build_tokenizer("bytes")


def _two_sources(tmp_path, **kw):
    img = make_shards(str(tmp_path / "img"), 2, 12, kind="it", prefix="img")
    aud = make_shards(str(tmp_path / "aud"), 2, 12, kind="at", prefix="aud")
    cfg = make_cfg(img, **kw)
    cfg.data.train = [SourceConfig(name="images", urls=img, weight=3.0),
                      SourceConfig(name="audio", urls=aud, weight=1.0)]
    return cfg


def test_mixing_by_weight(tmp_path):
    cfg = _two_sources(tmp_path, batch=16, workers=0, buffer=4)
    loader = build_train_loader(cfg, 0, 1, TOK)
    mixed, n_img = 0, 0
    for _ in range(40):
        b = next(loader)
        is_img = [s == "images" for s in b.sources]
        n_img += sum(is_img)
        mixed += 0 < sum(is_img) < 16
        assert b.masks["image"].tolist() == is_img and b.masks["audio"].tolist() == [not x for x in is_img]
    share = n_img / 640
    assert abs(share - 0.75) < 0.05, share  # binomial sd ~0.017
    assert mixed >= 35  # sources with different modality sets share batches
    st = loader.stats()
    assert st["per_source"] == {"images": n_img, "audio": 640 - n_img}


def test_same_seed_same_stream(tmp_path):
    cfg = _two_sources(tmp_path, batch=6, workers=0)
    a, b = build_train_loader(cfg, 0, 1, TOK), build_train_loader(cfg, 0, 1, TOK)
    assert [next(a).keys for _ in range(5)] == [next(b).keys for _ in range(5)]
    a = build_train_loader(cfg, 0, 1, TOK)
    cfg.run.seed = 1
    c = build_train_loader(cfg, 0, 1, TOK)
    assert [next(a).keys for _ in range(5)] != [next(c).keys for _ in range(5)]


def test_changed_world_size_or_workers_refused(tmp_path):
    cfg = _two_sources(tmp_path, batch=4, workers=0)
    loader = build_train_loader(cfg, 0, 1, TOK)
    next(loader)
    state = loader.state_dict()
    with pytest.raises(DataError, match="world size 1.*has 2"):
        build_train_loader(cfg, 0, 2, TOK).load_state_dict(state)
    cfg.data.num_workers = 2
    with pytest.raises(DataError, match="1 data workers.*has 2"):
        build_train_loader(cfg, 0, 1, TOK).load_state_dict(state)
    cfg.data.num_workers = 0
    cfg.data.train[0].weight = 2.0
    with pytest.raises(DataError, match="data config changed.*sources"):
        build_train_loader(cfg, 0, 1, TOK).load_state_dict(state)


def test_byte_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer("bytes")
    text = "héllo wörld 🎵"
    assert tok.decode(tok.encode(text)) == text
    ids, lens = tok.encode_batch([text, "", "x" * 50], max_len=12)
    assert ids.shape == (3, 12) and ids.dtype == torch.long and lens.tolist() == [12, 2, 12]
    assert ids[1, :2].tolist() == [tok.bos_id, tok.eos_id] and ids[1, 2:].eq(tok.pad_id).all()
    assert ids[2, 0] == tok.bos_id and ids[2, 11] == tok.eos_id and tok.decode(ids[2].tolist()) == "x" * 10
    tok.save(str(tmp_path / "t"))
    again = build_tokenizer(str(tmp_path / "t"))
    assert again.vocab_size == tok.vocab_size == 259 and again.encode(text) == tok.encode(text)


def test_bpe_tokenizer_train_save_load(tmp_path):
    url = make_shards(str(tmp_path / "s"), 2, 20, kind="it")
    out = str(tmp_path / "tok")
    assert train_tokenizer.main(["--data", url, "--vocab-size", "300", "--out", out]) == 0
    tok = build_tokenizer(out)
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3 and tok.vocab_size <= 300
    text = "caption shard01_0003 ünïcode"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.pad_id not in ids
    assert len(tok.encode("caption shard00_0001")) < len("caption shard00_0001")  # merges learned
    batch, lens = tok.encode_batch([text], max_len=64)
    assert batch[0, 0] == tok.bos_id and batch[0, lens[0] - 1] == tok.eos_id
    assert tok.decode(batch[0].tolist()) == text  # specials and pad dropped
    tok.save(str(tmp_path / "tok2"))
    for spec in (str(tmp_path / "tok2"), os.path.join(out, "tokenizer.json")):
        t2 = build_tokenizer(spec)
        assert t2.encode(text) == ids and (t2.pad_id, t2.bos_id, t2.eos_id) == (tok.pad_id, tok.bos_id, tok.eos_id)
    with open(os.path.join(out, "tokenizer.json")) as f:
        assert json.load(f)["model"]["type"] == "BPE"
