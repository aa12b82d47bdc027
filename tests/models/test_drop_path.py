"""Per-tower dropout and stochastic depth (model.<tower>.dropout / drop_path)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny import fake_batch, tiny_cfg  # noqa: E402

from mmpretrain.config import ConfigError  # noqa: E402
from mmpretrain.models import build_model  # noqa: E402
from mmpretrain.models.transformer import Block, Encoder, drop_path, drop_path_rates  # noqa: E402


def test_drop_path_drops_whole_rows_at_the_rate_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(20000, 3, 4)
    y = drop_path(x, 0.3, training=True)
    rows = y.flatten(1)
    dropped = (rows == 0).all(1)
    assert (dropped | (rows != 0).all(1)).all()  # a row is dropped whole or not at all
    assert abs(float(dropped.float().mean()) - 0.3) < 0.015
    assert torch.allclose(rows[~dropped], torch.full_like(rows[~dropped], 1 / 0.7))  # kept rows scaled by 1/(1-p)
    assert abs(float(y.mean()) - 1.0) < 0.03
    state = torch.get_rng_state()
    assert drop_path(x, 0.3, training=False) is x and drop_path(x, 0.0, training=True) is x
    assert torch.equal(torch.get_rng_state(), state)  # p=0 / eval draws no random numbers


def test_rates_rise_linearly_with_depth():
    assert drop_path_rates(0.2, 5) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert drop_path_rates(0.2, 1) == [0.0]
    enc = Encoder(8, 3, 2, 2.0, drop_path=0.1)
    assert [b.drop_path for b in enc.blocks] == pytest.approx([0.0, 0.05, 0.1])


def test_block_eval_unchanged_train_differs_and_p0_is_todays_block():
    torch.manual_seed(1)
    ref = Block(16, 2, 2.0)
    blk = Block(16, 2, 2.0, drop_path=0.5)
    blk.load_state_dict(ref.state_dict())
    x = torch.randn(64, 5, 16)
    ref.eval(), blk.eval()
    assert torch.equal(blk(x), ref(x))
    ref.train(), blk.train()
    torch.manual_seed(7)
    a = ref(x)
    torch.manual_seed(7)
    b = blk(x)
    assert not torch.allclose(a, b)
    # some rows keep both branches (equal to the plain block up to the 1/(1-p) scale), some lose both (= x)
    assert ((b - x).flatten(1).abs().amax(1) == 0).any()
    p0 = Block(16, 2, 2.0, drop_path=0.0)
    p0.load_state_dict(ref.state_dict())
    torch.manual_seed(7)
    assert torch.equal(p0(x), a)


def test_per_tower_settings_reach_their_modules():
    cfg = tiny_cfg("model.dropout=0.1", "model.vision.depth=3", "model.vision.drop_path=0.2",
                   "model.audio.dropout=0.3", "model.text.depth=2", "model.text.drop_path=0.1")
    m = build_model(cfg, 300)
    img, aud, txt = (m.towers[k].encoder.blocks for k in ("image", "audio", "text"))
    assert [b.drop_path for b in img] == pytest.approx([0.0, 0.1, 0.2])
    assert [b.drop_path for b in aud] == [0.0] and [b.drop_path for b in txt] == pytest.approx([0.0, 0.1])
    assert [b.attn.dropout for b in img] == [0.1] * 3  # unset: model.dropout
    assert aud[0].attn.dropout == 0.3 and txt[0].attn.dropout == 0.1
    assert all(b.drop_path == 0.0 and b.attn.dropout == 0.1 for b in m.decoder.encoder.blocks)


def test_defaults_build_todays_model_bit_identically():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    a = build_model(cfg, 300)
    torch.manual_seed(0)
    b = build_model(tiny_cfg("model.vision.drop_path=0.0", "model.text.dropout=0.0"), 300)
    batch = fake_batch(cfg, 4)
    a.train(), b.train()
    torch.manual_seed(3)
    out_a = a(batch)
    torch.manual_seed(3)
    out_b = b(batch)
    for k in out_a.embeddings:
        assert torch.equal(out_a.embeddings[k], out_b.embeddings[k])


@pytest.mark.parametrize("override, key", [
    ("model.vision.drop_path=1.0", "model.vision.drop_path"), ("model.audio.drop_path=-0.1", "model.audio.drop_path"),
    ("model.text.dropout=1.5", "model.text.dropout")])
def test_bad_rates_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_cfg(override)
