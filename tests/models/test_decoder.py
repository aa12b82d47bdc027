"""The CoCa decoder and caption loss: masking (padding, absent modality, the other modality's
tokens), loss weighting, and a tiny model that learns to caption in a few dozen steps."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import fake_batch, tiny_cfg  # noqa: E402

from mmpretrain.config import GenerationConfig  # noqa: E402
from mmpretrain.data.tokenizer import ByteTokenizer  # noqa: E402
from mmpretrain.engine import TrainModule  # noqa: E402
from mmpretrain.generation import caption_context, decoder_logits, generate_captions  # noqa: E402
from mmpretrain.losses import caption_loss  # noqa: E402
from mmpretrain.models import build_model  # noqa: E402


def _model(*ov, seed=0):
    cfg = tiny_cfg(*ov)
    torch.manual_seed(seed)
    return cfg, build_model(cfg, 259)


def test_uniform_decoder_gives_log_vocab_and_counts_tokens():
    cfg, model = _model()
    torch.nn.init.zeros_(model.decoder.head.weight)  # uniform next-token distribution
    b = fake_batch(cfg, 4, drop=("audio",))
    loss, m = caption_loss(model(b).caption)
    assert float(loss.detach()) == pytest.approx(torch.log(torch.tensor(259.0)).item(), rel=1e-5)
    # target tokens: (len - 1) per valid row; audio rows of odd samples are absent
    want = int((b.caption_len["image"] - 1).sum() + (b.caption_len["audio"][0::2] - 1).sum())
    assert int(m["caption/tokens"]) == want


def test_padding_absent_rows_and_other_modality_do_not_matter():
    cfg, model = _model()
    model.eval()
    b = fake_batch(cfg, 4, drop=("audio",))
    base, _ = caption_loss(model(b).caption)
    b2 = b.select(range(len(b)))  # a copy
    for k in ("image", "audio"):  # garbage after EOS
        caps, L = b2.captions[k], b2.captions[k].shape[1]
        pos = torch.arange(L)[None]
        b2.captions[k] = torch.where(pos >= b2.caption_len[k][:, None], torch.randint(0, 256, caps.shape), caps)
    b2.captions["audio"][1] = torch.randint(0, 256, (b2.captions["audio"].shape[1],))  # absent audio: any caption
    same, _ = caption_loss(model(b2).caption)
    assert float(same.detach()) == pytest.approx(float(base.detach()), rel=1e-6)
    # image captions are decoded from image tokens only: other audio changes nothing for them ...
    with torch.no_grad():
        toks = b.captions["image"]
        no_audio = {"audio": torch.zeros(4, dtype=torch.bool)}
        ci, mi = caption_context(model, {"image": b.inputs["image"], "audio": b.inputs["audio"]}, no_audio)
        ci2, mi2 = caption_context(model, {"image": b.inputs["image"], "audio": torch.randn_like(b.inputs["audio"])},
                                   no_audio)
        l1 = decoder_logits(model, toks[:4], ci, mi)
        l2 = decoder_logits(model, toks[:4], ci2, mi2)
        torch.testing.assert_close(l1, l2)
        # ... while letting the decoder see the audio does change them (the mask has an effect)
        cj, mj = caption_context(model, {"image": b.inputs["image"], "audio": torch.randn_like(b.inputs["audio"])})
        assert not torch.allclose(l1, decoder_logits(model, toks[:4], cj, mj))


def test_total_is_weighted_sum_and_all_parameters_get_gradients():
    cfg, model = _model("loss.contrastive_weight=0.5", "loss.caption_weight=3.0")
    b = fake_batch(cfg, 6, drop=("text",))
    total, m = TrainModule(model, cfg)(b)
    assert float(total.detach()) == pytest.approx(0.5 * float(m["loss/contrastive"]) + 3.0 * float(m["loss/caption"]), rel=1e-5)
    assert float(m["loss"]) == pytest.approx(float(total.detach()), rel=1e-5)
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad
    assert model.decoder.poolers["audio"].queries.grad.abs().sum() > 0


@pytest.mark.parametrize("queries", [4, 0])
def test_tiny_decoder_learns_to_caption(queries):
    """Three classes, class-dependent images and audio: after 120 steps greedy decoding gives each
    sample's image caption from its image and its (different) audio caption from its audio."""
    cfg, model = _model(f"model.text.decoder_queries={queries}", "loss.pairs.image_text=0", "loss.pairs.audio_text=0",
                        "loss.pairs.image_audio=0")
    tm = TrainModule(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for step in range(120):
        b = fake_batch(cfg, 6, seed=step % 3)
        loss, m = tm(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else float(m["loss/caption"])
    assert float(m["loss/caption"]) < 0.01 * first
    test = fake_batch(cfg, 3, seed=99)  # new noise
    tok = ByteTokenizer()
    g = GenerationConfig(max_new_tokens=20)
    img_caps = generate_captions(model, tok, {"image": test.inputs["image"]}, cfg=g)
    aud_caps = generate_captions(model, tok, {"audio": test.inputs["audio"]}, cfg=g)
    want_img = [tok.decode(test.captions["image"][i, 1: test.caption_len["image"][i] - 1].tolist()) for i in range(3)]
    want_aud = [tok.decode(test.captions["audio"][i, 1: test.caption_len["audio"][i] - 1].tolist()) for i in range(3)]
    assert img_caps == want_img
    assert aud_caps == want_aud
