"""HuggingFace audio towers (mmpretrain.models.hf_audio): AST, Whisper encoder, wav2vec2, HuBERT,
tiny ones made from configs by tools/make_tiny_hf_audio.py; front end = the model's own feature
extractor, the tower = AutoModel, nothing added or lost between them."""
from __future__ import annotations

import importlib.util
import io
import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest
import soundfile as sf
import torch

from mmpretrain.data.decode import decode_audio
from mmpretrain.models.hf_audio import (HFAudioDecoder, build_hf_audio_tower, check_hf_audio, hf_audio_decode,
                                        hf_audio_frontend, hf_audio_sample_shape)

KINDS = ("ast", "whisper", "wav2vec2", "hubert")
SR = 16000
ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("make_tiny_hf_audio", ROOT / "tools" / "make_tiny_hf_audio.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return _tool().make_tiny_audio_dirs(tmp_path_factory.mktemp("hf_audio"))


def data_cfg(clip_seconds: float = 1.0, sample_rate: int = SR):
    return NS(audio=NS(sample_rate=sample_rate, clip_seconds=clip_seconds))


def full_cfg(path, init="auto", pooling="auto", clip_seconds=1.0):
    return NS(model=NS(audio=NS(kind="hf", hf_path=str(path), init=init, pooling=pooling)),
              data=data_cfg(clip_seconds))


def wave(seed: int = 0, seconds: float = 1.0, freq: float = 440.0) -> np.ndarray:
    r = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    w = 0.3 * np.sin(2 * np.pi * freq * t + r.uniform(0, 2 * np.pi)) + 0.02 * r.standard_normal(t.shape)
    return w.astype(np.float32)


def reference(path, family):
    """What a user gets from transformers directly: the extractor and AutoModel (Whisper: its encoder)."""
    from transformers import AutoFeatureExtractor, AutoModel

    fe = AutoFeatureExtractor.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return fe, (model.get_encoder() if family == "whisper" else model)


def extract(fe, w, family):
    out = fe(w, sampling_rate=SR, return_tensors="np")
    return out["input_features" if family == "whisper" else "input_values"][0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("clip", [1.0, 0.5])
def test_frontend_is_the_extractor(dirs, kind, clip):
    fe_ref, _ = reference(dirs[kind], kind)
    front = hf_audio_frontend(str(dirs[kind]), data_cfg(clip))
    w = wave(1, clip)
    x = front(w)
    assert x.dtype == np.float32 and x.shape == front.sample_shape == hf_audio_sample_shape(data_cfg(clip), dirs[kind])
    assert np.array_equal(x, extract(fe_ref, w, kind))
    want = {"ast": (100, 32), "whisper": (20, 100)}.get(kind, (int(SR * clip),))
    assert x.shape == want


def test_decoder_decodes_then_applies_frontend(dirs, tmp_path):
    buf = io.BytesIO()
    sf.write(buf, np.concatenate([wave(2, 1.5)] * 1), 22050, format="WAV")  # resampled by our decode
    data = buf.getvalue()
    d = data_cfg()
    for kind in ("ast", "wav2vec2"):
        dec = pickle.loads(pickle.dumps(hf_audio_decode(str(dirs[kind]))))  # loader workers may be spawned
        assert isinstance(dec, HFAudioDecoder)
        front = hf_audio_frontend(str(dirs[kind]), d)
        assert np.array_equal(dec(data, d, None), front(decode_audio(data, SR, 1.0, None)))
        rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)  # training crop: our augmentation
        assert np.array_equal(dec(data, d, rng_a), front(decode_audio(data, SR, 1.0, rng_b)))
        # a decoder bound to a built front end gives the same
        assert np.array_equal(hf_audio_decode(front)(data, d, None), dec(data, d, None))


@pytest.mark.parametrize("kind", KINDS)
def test_tower_equals_automodel(dirs, kind):
    fe_ref, ref = reference(dirs[kind], kind)
    tower = build_hf_audio_tower(full_cfg(dirs[kind]), 0).eval()
    assert tower.width == 32 and len(tower.layers()) == 2
    front = hf_audio_frontend(str(dirs[kind]), data_cfg())
    x = torch.from_numpy(np.stack([front(wave(3)), front(wave(4, freq=1000.0))]))
    with torch.no_grad():
        pooled, tokens = tower(x)
        key = "input_features" if kind == "whisper" else "input_values"
        out = ref(**{key: torch.from_numpy(np.stack([extract(fe_ref, wave(3), kind),
                                                      extract(fe_ref, wave(4, freq=1000.0), kind)]))})
    h = out.last_hidden_state
    assert pooled.shape == (2, 32) and tokens.dim() == 3 and tokens.shape[0] == 2 and tokens.shape[2] == 32
    if kind == "ast":  # 1 s = 98 frames of 100: every time patch starts inside the clip
        assert tokens.shape[1] == 18
        torch.testing.assert_close(tokens, h[:, 2:], rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled, out.pooler_output, rtol=0, atol=1e-5)  # pooling auto = cls
    else:
        torch.testing.assert_close(tokens, h, rtol=0, atol=1e-5)
        torch.testing.assert_close(pooled, h.mean(1), rtol=0, atol=1e-5)
    assert not torch.allclose(pooled[0], pooled[1])


@pytest.mark.parametrize("kind", ["ast", "whisper"])
def test_padding_is_not_content(dirs, kind):
    """A 0.5 s clip: AST tokens are the patches that start inside it, Whisper tokens the encoder
    positions of the clip (not of the padded window); the mean is over those only."""
    _, ref = reference(dirs[kind], kind)
    tower = build_hf_audio_tower(full_cfg(dirs[kind], pooling="mean", clip_seconds=0.5), 0).eval()
    x = torch.from_numpy(hf_audio_frontend(str(dirs[kind]), data_cfg(0.5))(wave(6, 0.5)))[None]
    with torch.no_grad():
        pooled, tokens = tower(x)
        h = ref(x).last_hidden_state
    if kind == "whisper":  # 50 mel frames of 100 -> 25 of 50 positions
        assert tokens.shape == (1, 25, 32)
        torch.testing.assert_close(tokens, h[:, :25], rtol=0, atol=1e-5)
    else:  # 48 frames of 100, time stride 10 -> 5 of 9 time patches, in each of 2 frequency rows
        assert tokens.shape == (1, 10, 32)
        patches = h[:, 2:].reshape(1, 2, 9, 32)[:, :, :5].reshape(1, 10, 32)
        torch.testing.assert_close(tokens, patches, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, tokens.mean(1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_random_init_differs_and_gradients_flow(dirs, kind):
    hf = build_hf_audio_tower(full_cfg(dirs[kind], init="hf"), 0)
    torch.manual_seed(12345)  # not the seed the tiny "pretrained" weights were drawn with
    rnd = build_hf_audio_tower(full_cfg(dirs[kind], init="random"), 0)
    a, b = hf.state_dict(), rnd.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    x = torch.from_numpy(np.stack([hf_audio_frontend(str(dirs[kind]), data_cfg())(wave(i)) for i in range(2)]))
    with torch.no_grad():
        assert not torch.allclose(hf.eval()(x)[0], rnd.eval()(x)[0])
    hf.train()
    pooled, tokens = hf(x)
    (pooled.square().sum() + tokens.square().mean()).backward()
    trainable = [(n, p) for n, p in hf.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad
    assert sum(float(p.grad.abs().sum()) for _, p in trainable) > 0


def test_bf16_tower_takes_fp32_features(dirs):
    """The audio modality keeps its inputs fp32; a bf16 tower casts them at its door."""
    for kind in ("ast", "whisper"):
        tower = build_hf_audio_tower(full_cfg(dirs[kind]), 0).to(torch.bfloat16)
        x = torch.from_numpy(hf_audio_frontend(str(dirs[kind]), data_cfg())(wave(9)))[None]
        pooled, tokens = tower(x)
        assert pooled.dtype == tokens.dtype == torch.bfloat16 and torch.isfinite(pooled.float()).all()


def test_training_mode_is_deterministic_without_layerdrop(dirs):
    """wav2vec2/HuBERT configs ship layerdrop 0.1 and SpecAugment: both are off in the tower (ranks
    must run the same layers under ZeRO-3; numpy-RNG masking would break exact resume)."""
    for kind in ("wav2vec2", "hubert"):
        cfg_json = json.loads((dirs[kind] / "config.json").read_text())
        assert cfg_json["layerdrop"] > 0 and cfg_json["mask_time_prob"] > 0  # the hub defaults
        tower = build_hf_audio_tower(full_cfg(dirs[kind]), 0).train()
        assert tower.model.config.layerdrop == 0 and not tower.model.config.apply_spec_augment
        x = torch.from_numpy(hf_audio_frontend(str(dirs[kind]), data_cfg())(wave(7)))[None]
        torch.manual_seed(1)
        a = tower(x)[1]
        torch.manual_seed(2)
        assert torch.equal(a, tower(x)[1])


def test_whisper_window_follows_the_model(dirs, tmp_path):
    """An extractor whose chunk_length disagrees with the encoder's window: the front end pads/cuts
    to 2 * max_source_positions frames, the one length the encoder accepts."""
    from transformers import AutoFeatureExtractor

    d = tmp_path / "whisper2"
    shutil.copytree(dirs["whisper"], d)
    fe = AutoFeatureExtractor.from_pretrained(dirs["whisper"])
    fe.chunk_length, fe.n_samples, fe.nb_max_frames = 2, 2 * SR, 200  # 2 s window: 200 frames
    fe.save_pretrained(d)
    front = hf_audio_frontend(str(d), data_cfg())
    w = wave(8)
    x = front(w)
    assert x.shape == (20, 100)
    assert extract(AutoFeatureExtractor.from_pretrained(d), w, "whisper").shape == (20, 200)  # what it would give
    want = AutoFeatureExtractor.from_pretrained(d)(w, sampling_rate=SR, return_tensors="np", padding="max_length",
                                                   max_length=100 * 160, truncation=True)["input_features"][0]
    assert np.array_equal(x, want)
    pooled, tokens = build_hf_audio_tower(full_cfg(d), 0)(torch.from_numpy(x)[None])
    assert tokens.shape == (1, 50, 32)


def test_bad_input_named(dirs, tmp_path):
    ast = str(dirs["ast"])
    msg = check_hf_audio(ast, data_cfg(sample_rate=22050))
    assert msg and all(s in msg for s in ("data.audio.sample_rate", "22050", "16000", ast, "model.audio.hf_path"))
    with pytest.raises(ValueError, match="data.audio.sample_rate"):
        hf_audio_frontend(ast, data_cfg(sample_rate=22050))
    with pytest.raises(ValueError, match="22050"):
        build_hf_audio_tower(NS(model=NS(audio=NS(hf_path=ast)), data=data_cfg(sample_rate=22050)), 0)

    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=50)).save_pretrained(bert)
    msg = check_hf_audio(str(bert), data_cfg())
    assert msg and "model.audio.hf_path" in msg and str(bert) in msg and "'bert'" in msg
    with pytest.raises(ValueError, match="not an audio encoder"):
        build_hf_audio_tower(full_cfg(bert), 0)

    missing = tmp_path / "nowhere"
    assert "no such directory" in check_hf_audio(str(missing), data_cfg())
    assert "is empty" in check_hf_audio("", data_cfg())
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in check_hf_audio(str(empty), data_cfg())
    no_pre = tmp_path / "no_pre"
    shutil.copytree(dirs["ast"], no_pre)
    (no_pre / "preprocessor_config.json").unlink()
    assert "no preprocessor_config.json" in check_hf_audio(str(no_pre), data_cfg())
    no_weights = tmp_path / "no_weights"
    shutil.copytree(dirs["ast"], no_weights)
    (no_weights / "model.safetensors").unlink()
    assert "no weights" in check_hf_audio(str(no_weights), data_cfg(), init="hf")
    assert check_hf_audio(str(no_weights), data_cfg(), init="random") is None
    assert "data.audio.clip_seconds" in check_hf_audio(str(dirs["whisper"]), data_cfg(clip_seconds=2.0))
    assert "data.audio.clip_seconds" in check_hf_audio(ast, data_cfg(clip_seconds=1.5))
    with pytest.raises(ValueError, match="model.audio.pooling"):
        build_hf_audio_tower(full_cfg(dirs["wav2vec2"], pooling="cls"), 0)
    for kind in KINDS:
        assert check_hf_audio(str(dirs[kind]), data_cfg()) is None


def test_ast_tower_learns_tones(dirs):
    """Front end + pretrained-format tower + a linear head separate two tone classes in a few steps."""
    torch.manual_seed(0)
    front = hf_audio_frontend(str(dirs["ast"]), data_cfg())
    tower = build_hf_audio_tower(full_cfg(dirs["ast"], init="random"), 0).train()
    head = torch.nn.Linear(tower.width, 2)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=3e-3)
    r = np.random.default_rng(0)
    labels = torch.tensor([0, 1] * 8)

    def clips(ys):
        return torch.from_numpy(np.stack([front(wave(int(r.integers(1 << 30)), freq=300.0 if y == 0 else 2000.0)
                                                * r.uniform(0.3, 1.5)) for y in ys.tolist()]))

    x = clips(labels)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(head(tower(x)[0]), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    held_out = torch.tensor([1, 0] * 4)  # new clips: other phases, noise and loudness
    with torch.no_grad():
        acc = (head(tower.eval()(clips(held_out))[0]).argmax(1) == held_out).float().mean().item()
    assert acc >= 0.875, acc


def test_tool_help(capsys):
    with pytest.raises(SystemExit) as e:
        _tool().main(["--help"])
    assert e.value.code == 0 and "--out" in capsys.readouterr().out


def test_wired_into_the_model(dirs, monkeypatch):
    """The wiring the registry gets (decode / sample_shape / an "hf" tower builder for audio), done
    here by patching the registry: the whole model with an HF audio tower (locked but for its last
    layer) trains, collate's absent-sample zeros have the front end's shape, preflight names keys."""
    import dataclasses

    from mmpretrain import modalities as M
    from mmpretrain.config import ConfigError
    from mmpretrain.losses import ContrastiveLoss
    from mmpretrain.models import hf_audio
    from mmpretrain.models.model import MultimodalModel
    from models.tiny import fake_batch, tiny_cfg

    audio = M.get("audio")
    wired = dataclasses.replace(audio, decode=hf_audio.audio_decode, sample_shape=hf_audio.audio_sample_shape,
                                towers={**audio.towers, "hf": hf_audio.build_hf_audio_tower})
    monkeypatch.setitem(M._REGISTRY, "audio", wired)
    path = str(dirs["ast"])
    cfg = tiny_cfg("data.audio.sample_rate=16000", "data.audio.clip_seconds=1.0", "model.audio.kind=hf",
                   f"model.audio.hf_path={path}", "model.audio.lock=true", "model.audio.unlock_last_n_layers=1")
    assert wired.sample_shape(cfg.data) == (16000,)  # no front end named yet: the waveform
    if not hasattr(cfg.data.audio, "feature_extractor"):  # the key the registry's wiring adds
        cfg.data.audio.feature_extractor = None
    hf_audio.resolve_audio_frontend(cfg)
    assert cfg.data.audio.feature_extractor == path and wired.sample_shape(cfg.data) == (100, 32)
    hf_audio.check_audio_tower(cfg)
    buf = io.BytesIO()
    sf.write(buf, wave(3), SR, format="FLAC")
    assert np.array_equal(wired.decode(buf.getvalue(), cfg.data, None),
                          hf_audio_frontend(path, cfg.data)(decode_audio(buf.getvalue(), SR, 1.0, None)))

    torch.manual_seed(0)
    model = MultimodalModel(cfg, 259)
    tower = model.towers["audio"]
    assert isinstance(tower, hf_audio.HFAudioTower)
    _, ref = reference(path, "ast")
    assert all(torch.equal(p, ref.state_dict()[k]) for k, p in tower.model.state_dict().items())  # not re-initialised
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.layernorm.")) for n in trainable), trainable
    frozen_before = {n: p.detach().clone() for n, p in tower.named_parameters() if not p.requires_grad}

    b = fake_batch(cfg, 8)
    b.inputs["audio"] = torch.from_numpy(np.stack([hf_audio.audio_from_waveform(w.numpy(), cfg.data)
                                                   for w in b.inputs["audio"]]))
    loss_fn = ContrastiveLoss(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        out = model(b, captions=False)
        loss, _ = loss_fn(out.embeddings, out.scales, out.biases, b.masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(p, frozen_before[n]) for n, p in tower.named_parameters() if n in frozen_before)

    cfg.data.audio.sample_rate = 22050
    with pytest.raises(ConfigError, match="data.audio.sample_rate"):
        hf_audio.check_audio_tower(cfg)
    cfg.data.audio.sample_rate = SR
    cfg.model.audio.kind = "native"
    with pytest.raises(ConfigError, match="data.audio.feature_extractor"):
        hf_audio.check_audio_tower(cfg)
