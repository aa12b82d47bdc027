"""(a) Tiny real shards (png, jpg, flac, wav, txt, json) decode to the right shapes and values."""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shardkit import image_bytes, make_cfg, tone_bytes, write_tar  # noqa: E402

from mmpretrain.data import build_eval_loader, build_tokenizer  # noqa: E402
from mmpretrain.data.decode import decode_audio, decode_image, resample  # noqa: E402


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spec.argmax()])


def test_decoded_batch_values(tmp_path):
    samples = [
        {"__key__": "a", "png": image_bytes((255, 0, 0)), "txt": "red square".encode()},
        {"__key__": "b", "jpg": image_bytes((0, 0, 255), fmt="jpg"), "flac": tone_bytes(440, rate=16000),
         "json": json.dumps({"caption": "blue", "caption_audio": "a tone", "label": 3}).encode()},
        {"__key__": "c", "wav": tone_bytes(1000, rate=8000, seconds=0.1, fmt="wav"), "txt": "short tone".encode()},
    ]
    write_tar(str(tmp_path / "s-0.tar"), samples)
    cfg = make_cfg(str(tmp_path / "s-0.tar"))
    tok = build_tokenizer("bytes")
    (batch,) = list(build_eval_loader(str(tmp_path / "s-0.tar"), cfg, tok, batch_size=8))
    assert batch.keys == ["a", "b", "c"] and batch.sources == ["eval"] * 3
    assert batch.inputs["image"].shape == (3, 3, 16, 16) and batch.inputs["image"].dtype == torch.uint8
    assert batch.masks["image"].tolist() == [True, True, False]
    assert batch.inputs["audio"].shape == (3, 2000) and batch.masks["audio"].tolist() == [False, True, True]
    pix = batch.inputs["image"].numpy().transpose(0, 2, 3, 1) / 255.0
    np.testing.assert_allclose(pix[0], np.broadcast_to([1, 0, 0], pix[0].shape), atol=1e-3)
    np.testing.assert_allclose(pix[1].mean((0, 1)), [0, 0, 1], atol=0.03)  # jpg: lossy
    assert (batch.inputs["image"][2] == 0).all() and (batch.inputs["audio"][0] == 0).all()
    # 440 Hz flac at 16 kHz resampled to 8 kHz; 1 kHz wav of 0.1 s repeat-padded to 0.25 s
    audio, text, text_len = batch.inputs["audio"], batch.inputs["text"], batch.text_len
    assert abs(_peak_hz(audio[1].numpy(), 8000) - 440) < 8
    assert abs(_peak_hz(audio[2].numpy(), 8000) - 1000) < 8
    assert audio[2, :800].abs().max() > 0.3 and audio[2, 1600:].abs().max() > 0.3
    assert batch.labels.tolist() == [-1, 3, -1]
    texts = [tok.decode(text[i, : text_len[i]].tolist()) for i in range(3)]
    assert texts == ["red square", "blue", "short tone"]
    assert text[0, 0] == tok.bos_id and text[0, text_len[0] - 1] == tok.eos_id
    assert text[0, text_len[0]:].eq(tok.pad_id).all() and batch.masks["text"].all()
    cap_a = tok.decode(batch.captions["audio"][1, : batch.caption_len["audio"][1]].tolist())
    cap_i = tok.decode(batch.captions["image"][1, : batch.caption_len["image"][1]].tolist())
    assert (cap_a, cap_i) == ("a tone", "blue")  # caption_image falls back to the caption


def test_train_transforms_shapes_and_determinism():
    img = image_bytes((0, 255, 0), size=(64, 40))
    a = decode_image(img, 32, np.random.default_rng(1))
    b = decode_image(img, 32, np.random.default_rng(1))
    assert a.shape == (3, 32, 32) and a.dtype == np.uint8 and np.array_equal(a, b)
    np.testing.assert_array_equal(a.transpose(1, 2, 0), np.broadcast_to([0, 255, 0], (32, 32, 3)))
    x = decode_audio(tone_bytes(300, rate=16000, seconds=2.0), 16000, 0.5, np.random.default_rng(0))
    assert x.shape == (8000,) and abs(_peak_hz(x, 16000) - 300) < 4


def test_soxr_and_scipy_resample_alike(monkeypatch):
    """44.1 -> 16 kHz: libsoxr (used when installed) and scipy's polyphase fallback give the same
    tone, length and level (away from the edges, where their filters start up differently)."""
    import builtins

    import pytest

    t = np.arange(44100) / 44100
    x = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)
    fast = resample(x, 44100, 16000)
    stereo = resample(np.stack([x, -x]), 44100, 16000)  # (channels, time): along the last axis
    assert stereo.shape == (2, len(fast)) and np.allclose(stereo[0], fast, atol=1e-6) and np.allclose(stereo[0], -stereo[1])
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "soxr" else real_import(name, *a, **k))
    slow = resample(x, 44100, 16000)
    assert fast.dtype == slow.dtype == np.float32 and abs(len(fast) - len(slow)) <= 1 and len(slow) == 16000
    mid = slice(1000, 15000)
    assert np.abs(fast[mid] - slow[mid]).max() < 1e-2
    assert _peak_hz(fast, 16000) == pytest.approx(440, abs=2) and _peak_hz(slow, 16000) == pytest.approx(440, abs=2)


def test_resize_crop_computes_pils_bicubic_filter():
    """The crop + resize kernel (torch's uint8 antialiased bicubic) against PIL's BICUBIC resize of
    the same crop on a photo-like image: equal to a level's rounding when downscaling (the training
    case) and upscaling; close after a large reduction (both first average blocks, PIL by another factor)."""
    from PIL import Image

    from mmpretrain.data.decode import resize_crop

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:384, 0:1530]
    base = np.stack([x * 0.5, y * 0.6, (x + y) * 0.3], -1) % 255
    img = Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    for box, size in (((10, 5, 380, 375), 224), ((100, 40, 124, 64), 56)):
        got = resize_crop(img, box, size).astype(int)
        ref = np.asarray(img.crop(box).resize((size, size), Image.BICUBIC)).astype(int)
        assert got.shape == (size, size, 3) and np.abs(got - ref).max() <= 1, box
    got = resize_crop(img, (0, 0, 1530, 384), 32).astype(int)
    ref = np.asarray(img.resize((32, 32), Image.BICUBIC, reducing_gap=3.0)).astype(int)
    assert np.abs(got - ref).mean() < 1.0 and np.abs(got - ref).max() <= 12


def test_resize_crop_falls_back_to_pil_without_the_uint8_kernel(monkeypatch):
    from PIL import Image

    from mmpretrain.data.decode import resize_crop

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8))

    def no_uint8(*args, **kwargs):
        raise RuntimeError("upsample_bicubic2d_aa not implemented for 'Byte'")

    monkeypatch.setattr(torch.nn.functional, "interpolate", no_uint8)
    got = resize_crop(img, (5, 5, 45, 45), 20)
    assert np.array_equal(got, np.asarray(img.resize((20, 20), Image.BICUBIC, box=(5, 5, 45, 45))))
