"""The pooled-only last block (issue 15): a tower whose tokens nothing reads computes only its pooled
position (class token, EOS) in its last block. It must give the same embeddings and the same
gradients as the full forward (float64), with and without absent rows, checkpointing and decoder."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import fake_batch, tiny_cfg  # noqa: E402

from mmpretrain.models import build_model  # noqa: E402
from mmpretrain.models.audio import AudioTransformer  # noqa: E402
from mmpretrain.models.text import TextTransformer  # noqa: E402
from mmpretrain.models.transformer import Encoder  # noqa: E402
from mmpretrain.models.vision import VisionTransformer  # noqa: E402

TOWERS = (VisionTransformer, AudioTransformer, TextTransformer)
SHAPE = ("model.vision.depth=3", "model.text.depth=3", "model.audio.depth=2", "model.vision.heads=2",
         "model.text.heads=2", "model.audio.heads=2")


def _embeddings_and_grads(model, batch, pooled_only: bool, monkeypatch, captions: bool = True):
    for cls in TOWERS:
        monkeypatch.setattr(cls, "supports_pooled_only", pooled_only)
    model.zero_grad(set_to_none=True)
    out = model(batch, captions=captions)
    g = torch.Generator().manual_seed(7)
    loss = sum((e * torch.randn(e.shape, generator=g, dtype=e.dtype)).sum() for e in out.embeddings.values())
    if out.caption is not None:
        loss = loss + (out.caption.logits * torch.randn(out.caption.logits.shape, generator=g,
                                                        dtype=out.caption.logits.dtype)).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("extra,drop,captions", [
    ((), (), True),
    (("model.text.decoder_depth=2",), ("audio", "text"), True),
    (("model.text.decoder_depth=2",), (), False),
    (("model.vision.grad_checkpointing=true", "model.text.grad_checkpointing=true"), ("image",), True),
])
def test_same_embeddings_and_gradients_as_the_full_last_block(extra, drop, captions, monkeypatch):
    cfg = tiny_cfg(*SHAPE, *extra)
    torch.manual_seed(0)
    model = build_model(cfg, 259).double()
    batch = fake_batch(cfg, 6, drop=drop)
    batch.inputs = {k: v.double() if v.is_floating_point() else v for k, v in batch.inputs.items()}
    full, g_full = _embeddings_and_grads(model, batch, False, monkeypatch, captions)
    pruned, g_pruned = _embeddings_and_grads(model, batch, True, monkeypatch, captions)
    for m in full.embeddings:
        torch.testing.assert_close(pruned.embeddings[m], full.embeddings[m], rtol=0, atol=1e-12)
    decoded = set(model.decoder.modalities) if model.decoder is not None else set()
    for m, t in pruned.tokens.items():  # tokens kept exactly where the decoder reads them
        assert (t is not None) == (m in decoded), m
        if t is not None:
            torch.testing.assert_close(t, full.tokens[m], rtol=0, atol=1e-12)
    assert set(g_pruned) == set(g_full)  # every parameter still takes part (ZeRO-3 gathers all of them)
    for n in g_full:
        torch.testing.assert_close(g_pruned[n], g_full[n], rtol=0, atol=1e-10, msg=n)


def test_text_eos_query_sees_only_its_prefix():
    """A causal text row's EOS state must not depend on the tokens after EOS (padding or not)."""
    cfg = tiny_cfg(*SHAPE)
    torch.manual_seed(0)
    tower = build_model(cfg, 259).towers["text"].double()
    tokens = torch.randint(3, 200, (4, cfg.data.text_max_len))
    lengths = torch.tensor([5, 1, cfg.data.text_max_len, 9])
    a, states = tower(tokens, lengths, pooled_only=True)
    assert states is None and a.shape == (4, tower.width)
    other = tokens.clone()
    for i, n in enumerate(lengths.tolist()):
        other[i, n:] = torch.randint(3, 200, (cfg.data.text_max_len - n,))
    b, _ = tower(other, lengths, pooled_only=True)
    full, _ = tower(tokens, lengths)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    torch.testing.assert_close(full, a, rtol=0, atol=1e-12)


def test_last_block_does_a_quarter_of_its_work(monkeypatch):
    """The saving is real: the MLP of the last block sees one row per sample."""
    cfg = tiny_cfg(*SHAPE)
    torch.manual_seed(0)
    vision = build_model(cfg, 259).towers["image"]
    rows = []
    last = vision.encoder.blocks[-1].mlp[0]
    handle = last.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:-1].numel()))
    images = torch.randn(3, 3, cfg.data.image_size, cfg.data.image_size)
    vision(images)
    vision(images, pooled_only=True)
    handle.remove()
    assert rows == [3 * (vision.pos.shape[1]), 3]


def test_encoder_without_blocks_still_pools():
    """No last block to narrow: the encoder picks the asked positions itself, (B, 1, W) as with blocks."""
    enc = Encoder(8, 0, 2, 4.0)
    x = torch.randn(2, 5, 8)
    assert torch.equal(enc(x, pool_index=torch.tensor([0, 3])), torch.stack([x[0, :1], x[1, 3:4]]))
    assert torch.equal(enc(x), x)
