"""Caption variation: json caption fields holding lists; training draws one per sample and epoch
from the sample's seed, eval takes the first. And the loader with every augmentation on."""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shardkit import image_bytes, make_cfg, tone_bytes, write_tar  # noqa: E402

from mmpretrain.data import build_train_loader, build_tokenizer  # noqa: E402
from mmpretrain.data.samples import SampleProcessor, parse_source  # noqa: E402
from mmpretrain.data.shards import RawSample  # noqa: E402

OPTIONS = ["one red square", "a square in red", "red, four corners"]


def _raw(meta: dict, key: str = "k") -> RawSample:
    return RawSample(key=key, url="mem", files={"json": json.dumps(meta).encode()})


def _proc(train: bool, max_len: int = 24):
    cfg = make_cfg("unused.tar")
    cfg.data.text_max_len = max_len
    tok = build_tokenizer("bytes")
    return SampleProcessor(cfg.data, tok, train), parse_source(cfg.data.train[0], 0), tok


def _text(tok, ids) -> str:
    return tok.decode(ids)


def test_training_draws_every_option_eval_takes_the_first():
    proc, spec, tok = _proc(True)
    p = proc.prepare(_raw({"caption": OPTIONS}), spec)
    assert _text(tok, p.text) == OPTIONS[0] and len(p.text_options) == 3 and not p.truncated
    drawn = [_text(tok, proc.decode(p, epoch, (0, 0, 0, epoch, 0, 5)).text) for epoch in range(30)]
    assert set(drawn) == set(OPTIONS)  # all options seen over epochs
    again = [_text(tok, proc.decode(p, epoch, (0, 0, 0, epoch, 0, 5)).text) for epoch in range(30)]
    assert drawn == again  # the sample's seed decides: resume-exact
    by_position = {_text(tok, proc.decode(p, 0, (0, 0, 0, 0, 0, i)).text) for i in range(30)}
    assert by_position == set(OPTIONS)  # and across samples of one epoch
    ev, _, _ = _proc(False)
    assert {_text(tok, ev.decode(ev.prepare(_raw({"caption": OPTIONS}), spec), e, (0, 0, 0, e, 0, 5)).text)
            for e in range(10)} == {OPTIONS[0]}
    proc.cfg.caption_sampling = False  # caption variation off: the first, like eval
    assert {_text(tok, proc.decode(p, e, (0, 0, 0, e, 0, 5)).text) for e in range(10)} == {OPTIONS[0]}
    proc.cfg.caption_sampling, proc.cfg.train_augment = True, False  # all augmentation off: the first too
    assert _text(tok, proc.decode(p, 3, (0, 0, 0, 3, 0, 5)).text) == OPTIONS[0]


def test_caption_fields_per_modality_and_fallback():
    proc, spec, tok = _proc(True)
    caps = ["a tone", "a beep", "some sound"]
    p = proc.prepare(_raw({"caption": OPTIONS, "caption_audio": caps}), spec)
    assert _text(tok, p.captions["audio"]) == "a tone" and _text(tok, p.captions["image"]) == OPTIONS[0]
    pairs = set()
    for e in range(40):
        ex = proc.decode(p, e, (1, 0, 0, e, 0, 0))
        assert _text(tok, ex.captions["image"]) == _text(tok, ex.text)  # no own field: the drawn text
        pairs.add((_text(tok, ex.text), _text(tok, ex.captions["audio"])))
    assert {a for _, a in pairs} == set(caps) and len(pairs) > 3  # drawn independently of the text


def test_a_list_never_becomes_no_text():
    proc, spec, tok = _proc(True)
    p = proc.prepare(_raw({"caption": ["", 3, "  only this  "]}), spec)  # non-strings and blanks left out
    assert _text(tok, p.text) == "only this" and p.text_options == []
    ex = proc.decode(p, 0, (0,) * 6)
    assert _text(tok, ex.text) == "only this" and _text(tok, ex.captions["image"]) == "only this"
    raw = _raw({"caption": [], "caption_image": ["x"]})
    raw.files["png"] = image_bytes()
    empty = proc.prepare(raw, spec)
    assert empty.text is None  # no usable caption: absent text (as an empty string was), never a crash


def test_truncated_when_any_option_is_cut():
    proc, spec, tok = _proc(True, max_len=12)
    assert not proc.prepare(_raw({"caption": ["short", "tiny"]}), spec).truncated
    p = proc.prepare(_raw({"caption": ["short", "a caption far longer than twelve bytes"]}), spec)
    assert p.truncated and len(p.text_options[1]) == 12


def _shards(root) -> str:
    samples = []
    for i in range(12):
        samples.append({"__key__": f"s{i:02d}", "png": image_bytes((40 * i % 256, 90, 200), size=(24, 20)),
                        "flac": tone_bytes(200.0 + 50 * i, rate=8000, seconds=0.1 + 0.05 * (i % 4)),
                        "json": json.dumps({"caption": [f"cap {i} a", f"cap {i} b"], "label": i % 3}).encode()})
    write_tar(str(root / "aug-00000.tar"), samples[:6])
    write_tar(str(root / "aug-00001.tar"), samples[6:])
    with open(root / "sizes.json", "w") as f:
        json.dump({"aug-00000.tar": 6, "aug-00001.tar": 6}, f)
    return str(root / "aug-{00000..00001}.tar")


def _all_on(cfg) -> None:
    a, i = cfg.data.audio_augment, cfg.data.image_augment
    a.placement, a.gain_db, a.noise_prob, a.speed, a.mix_prob = "random", [-6.0, 6.0], 0.8, [0.9, 1.1], 0.5
    i.rotate_deg, i.scale, i.shear_deg, i.translate = 10.0, [0.9, 1.1], 5.0, 0.1
    i.brightness = i.contrast = i.saturation = 0.3
    i.blur_prob, i.erase_prob = 0.5, 0.5


def _batches(cfg, n: int):
    loader = build_train_loader(cfg, 0, 1, build_tokenizer("bytes"))
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


def test_loader_with_every_augmentation_is_seeded(tmp_path):
    urls = _shards(tmp_path)
    cfg = make_cfg(urls, batch=4, buffer=6)
    _all_on(cfg)
    a, b = _batches(cfg, 6), _batches(cfg, 6)  # two epochs of 12 samples
    for x, y in zip(a, b):
        assert x.keys == y.keys
        for m in ("image", "audio", "text"):
            assert torch.equal(x.inputs[m], y.inputs[m]), m
        assert torch.equal(x.captions["image"], y.captions["image"])
    assert all(torch.isfinite(x.inputs["audio"]).all() and torch.isfinite(x.inputs["image"]).all() for x in a)
    plain = make_cfg(urls, batch=4, buffer=6)
    c = _batches(plain, 6)
    assert [x.keys for x in c] == [x.keys for x in a]  # same samples, same order: augmentation draws elsewhere
    assert not torch.equal(c[0].inputs["audio"], a[0].inputs["audio"])
    assert not torch.equal(c[0].inputs["image"], a[0].inputs["image"])
    tok = build_tokenizer("bytes")
    texts = {}
    for x in a:
        for i, k in enumerate(x.keys):
            texts.setdefault(k, set()).add(tok.decode(x.inputs["text"][i, : x.text_len[i]].tolist()))
    assert all(t <= {f"cap {int(k[1:])} a", f"cap {int(k[1:])} b"} for k, t in texts.items())
    assert len({t for s in texts.values() for t in s}) > 12  # both options of some samples seen in 2 epochs
    first = {tok.decode(x.inputs["text"][i, : x.text_len[i]].tolist()) for x in c for i in range(len(x.keys))}
    assert len(first) > 12 and np.all([t.endswith((" a", " b")) for t in first])  # train_augment on by default


def test_resume_with_every_augmentation_is_exact(tmp_path):
    cfg = make_cfg(_shards(tmp_path), batch=4, buffer=6)
    _all_on(cfg)
    cfg.data.audio_augment.mix_prob = 1.0
    whole = _batches(cfg, 5)
    tok = build_tokenizer("bytes")
    first = build_train_loader(cfg, 0, 1, tok)
    for _ in range(2):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    other = make_cfg(cfg.data.train[0].urls, batch=3, seed=9)
    _all_on(other)
    _batches(other, 1)  # other clips decoded in between (another process would hold none)
    resumed = build_train_loader(cfg, 0, 1, tok)
    resumed.load_state_dict(state)
    for want in whole[2:]:  # mixing partners, noise, speed, captions: all the same after the resume
        got = next(resumed)
        assert got.keys == want.keys
        assert all(torch.equal(got.inputs[m], want.inputs[m]) for m in ("image", "audio", "text"))
    resumed.close()
