"""Issue 15: `model.<tower>.grad_checkpointing` recomputes activations in backward; the loss and
every gradient equal the run without it (dropout on: the RNG is replayed), native and HF towers."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "models"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from tiny import fake_batch, tiny_cfg  # noqa: E402

from mmpretrain.engine import TrainModule  # noqa: E402
from mmpretrain.models import build_model  # noqa: E402
from mmpretrain.models.transformer import Encoder  # noqa: E402

ALL = ("model.vision.grad_checkpointing=true", "model.audio.grad_checkpointing=true",
       "model.text.grad_checkpointing=true")


def _loss_and_grads(cfg, vocab, tok=None, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg, vocab)
    model.train()
    batch = fake_batch(cfg, 6, drop=("audio",))
    if tok is not None:  # an HF tower's own token ids for the text and both captions
        caps = ["a red circle", "a blue square", "a green cross"]
        ids, lens = tok.encode_batch([caps[i % 3] for i in range(6)], cfg.data.text_max_len)
        batch.inputs["text"], batch.text_len = ids, lens
        batch.captions = {m: ids.clone() for m in batch.captions}
        batch.caption_len = {m: lens.clone() for m in batch.caption_len}
    torch.manual_seed(1)  # the same dropout draws in both runs
    loss, _ = TrainModule(model, cfg)(batch)
    loss.backward()
    return model, float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b):
    assert abs(a[1] - b[1]) <= 1e-6 * max(1.0, abs(a[1])), (a[1], b[1])
    assert a[2].keys() == b[2].keys()
    for n in a[2]:
        torch.testing.assert_close(a[2][n], b[2][n], atol=1e-6, rtol=1e-5, msg=n)


def test_native_towers_and_decoder_recompute_with_the_same_loss_and_gradients():
    base = tiny_cfg("model.dropout=0.1", "model.vision.depth=2", "model.text.depth=2")
    off = _loss_and_grads(base, 259)
    on = _loss_and_grads(tiny_cfg("model.dropout=0.1", "model.vision.depth=2", "model.text.depth=2", *ALL), 259)
    encoders = [m for m in on[0].modules() if isinstance(m, Encoder)]
    assert encoders and all(m.grad_checkpointing for m in encoders)  # towers, caption module, decoder
    assert not any(m.grad_checkpointing for m in off[0].modules() if isinstance(m, Encoder))
    _same(off, on)


def test_an_hf_text_tower_recomputes_with_the_same_loss_and_gradients(tmp_path):
    import make_tiny_hf

    make_tiny_hf.make_bert(tmp_path / "bert", 16)
    over = ("model.text.kind=hf", f"model.text.hf_path={tmp_path / 'bert'}")
    from mmpretrain.data.hf_tokenizer import tokenizer_for

    cfg_off = tiny_cfg(*over)
    tok = tokenizer_for(cfg_off)
    off = _loss_and_grads(cfg_off, tok.vocab_size, tok)
    on = _loss_and_grads(tiny_cfg(*over, "model.text.grad_checkpointing=true"), tok.vocab_size, tok)
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in on[0].towers["text"].model.modules())
    _same(off, on)
