"""Issue 15 (1): captions cut by data.text_max_len are counted per source, never silent, and a
source with many cut captions is warned about naming the remedy."""
import logging
import os
import sys
import types

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shardkit import make_cfg, make_shards  # noqa: E402

from mmpretrain.config import SourceConfig  # noqa: E402
from mmpretrain.data import build_tokenizer, build_train_loader  # noqa: E402

TOK = build_tokenizer("bytes")


@pytest.mark.parametrize("max_len, cut", [(22, False), (21, True), (16, True)])
def test_cut_captions_are_counted_per_source(tmp_path, max_len, cut):
    """Captions are 'caption <key>', 20 bytes: BOS + 20 + EOS fits 22 tokens, not 21."""
    urls = make_shards(str(tmp_path / "a"), 2, 6, kind="it", prefix="shard")
    cfg = make_cfg(urls, batch=4)
    cfg.data.text_max_len = max_len
    cfg.data.train = [SourceConfig(name="long", urls=urls)]
    loader = build_train_loader(cfg, 0, 1, TOK)
    batches = [next(loader) for _ in range(3)]
    stats = loader.stats()
    loader.close()
    assert stats["per_source"]["long"] == 12
    assert stats["truncated"] == {"long": 12 if cut else 0} and stats["truncated_total"] == (12 if cut else 0)
    lens = [int(x) for b in batches for x in b.text_len]
    assert max(lens) == min(max_len, 22)  # cut captions keep max_len tokens, EOS last
    assert all(int(b.inputs["text"][i, n - 1]) == TOK.eos_id for b in batches for i, n in enumerate(b.text_len))


def test_a_source_with_many_cut_captions_is_warned_about_once(caplog):
    from mmpretrain.trainer import Trainer

    fake = types.SimpleNamespace(cfg=types.SimpleNamespace(data=types.SimpleNamespace(tokenizer="bytes", text_max_len=32)),
                                 TRUNCATION_WARN_SHARE=Trainer.TRUNCATION_WARN_SHARE, _truncation_warned=set())
    stats = {"per_source": {"laion": 100, "clean": 100}, "truncated": {"laion": 63, "clean": 5}}
    with caplog.at_level(logging.WARNING, logger="mmpretrain.train"):
        Trainer._warn_truncation(fake, stats)
        Trainer._warn_truncation(fake, stats)  # once per source
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "source 'laion': 63 of 100 captions (63%)" in lines[0] and "data.text_max_len=32" in lines[0]
    assert "tools/train_tokenizer.py" in lines[0]
