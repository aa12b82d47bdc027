"""Exports other tools load, in process on hand-made ZeRO-0 checkpoints of the tiny test model:
AutoModel / AutoTokenizer after `import mmpretrain.hf` (same embeddings as inference.load, buffers
restored after transformers' meta-device loading), the CLIPModel / CLIPProcessor directory (same
embeddings, same token ids, same pixels), the tokenizer files, the model card and file modes."""
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "models"))
from tiny import tiny_cfg, write_stage0_checkpoint  # noqa: E402

from mmpretrain import inference  # noqa: E402
from mmpretrain.checkpoint import tag_for  # noqa: E402
from mmpretrain.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer  # noqa: E402
from mmpretrain.export import export, main as export_main  # noqa: E402
from mmpretrain.models import build_model  # noqa: E402

TEXTS = ["a red circle", "héllo wörld — 猫 🐈", "x", "a much longer caption that the context truncates"]


def fake_run(root: Path, *overrides: str, step: int = 7, evals=()) -> Path:
    """A run dir with one complete stage-0 checkpoint of a perturbed random tiny model (and a
    metrics.jsonl holding `evals` records when given)."""
    cfg = tiny_cfg(f"run.output_dir={root}", *overrides)
    if cfg.model.text.kind == "hf" or cfg.model.vision.kind == "hf":
        from mmpretrain.data.hf_tokenizer import tokenizer_for
        from mmpretrain.models.hf import resolve_image_stats

        resolve_image_stats(cfg)  # as the trainer does before it saves the config
        vocab = tokenizer_for(cfg).vocab_size
    else:
        vocab = 259
    torch.manual_seed(3)
    model = build_model(cfg, vocab)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    write_stage0_checkpoint(root, cfg, model, step)
    if evals:
        (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return root


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _inputs(cfg, n: int = 4):
    g = torch.Generator().manual_seed(0)
    s = cfg.data.image_size
    ns = int(cfg.data.audio.sample_rate * cfg.data.audio.clip_seconds)
    return torch.randn(n, 3, s, s, generator=g), torch.randn(n, ns, generator=g)


def _unit(x) -> torch.Tensor:
    """get_*_features return a tensor (transformers 4.x) or an output with pooler_output (5.x)."""
    return F.normalize(x if isinstance(x, torch.Tensor) else x.pooler_output, dim=-1)


# ----------------------------------------------------------------------------- tokenizer files


def test_byte_tokenizer_exports_a_real_tokenizer_json(tmp_path):
    from transformers import AutoTokenizer

    ours = ByteTokenizer()
    ours.save(str(tmp_path), model_max_length=16)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (256, 257, 258) and hf.model_max_length == 16
    for t in TEXTS:
        assert hf(t)["input_ids"] == [257] + list(t.encode("utf-8")) + [258]
        assert hf.decode(hf(t)["input_ids"], skip_special_tokens=True) == t
    ids, lens = ours.encode_batch(TEXTS, 16)
    enc = hf(TEXTS, max_length=16, truncation=True, padding="max_length", return_tensors="pt")
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"].sum(1), lens)
    # our own reader still takes it (and an old export that holds only the marker) as the byte tokenizer
    assert isinstance(build_tokenizer(str(tmp_path)), ByteTokenizer)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / f).unlink()
    assert isinstance(build_tokenizer(str(tmp_path)), ByteTokenizer)


def test_bpe_tokenizer_saves_special_tokens_and_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a red circle", "a blue square", "a green cross"] * 20,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "src.json"))
    ours = HFTokenizer(str(tmp_path / "src.json"))  # adds <pad> <s> </s>
    ours.save(str(tmp_path / "out"), model_max_length=12)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (ours.pad_id, ours.bos_id, ours.eos_id)
    texts = ["a red square", "a green circle a blue cross a red circle"]
    ids, _ = ours.encode_batch(texts, 12)
    enc = hf(texts, max_length=12, truncation=True, padding="max_length", return_tensors="pt")
    assert torch.equal(enc["input_ids"], ids)
    again = build_tokenizer(str(tmp_path / "out"))
    assert torch.equal(again.encode_batch(texts, 12)[0], ids)


# ----------------------------------------------------------------------------- AutoModel


def test_automodel_loads_the_trimodal_export(tmp_path):
    import mmpretrain.hf  # noqa: F401 - registers model_type mmpretrain
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    run = fake_run(tmp_path / "run")  # conv stem: no CLIPModel, said why
    exp = export(run, tmp_path / "exp")
    meta = json.loads((exp / "config.json").read_text())
    assert meta["model_type"] == "mmpretrain" and meta["format"] == "mmpretrain-export/1" and "config" in meta
    assert meta["clip"].startswith("not exported: model.vision.stem='conv'") and not (exp / "clip").exists()
    assert isinstance(AutoConfig.from_pretrained(exp), mmpretrain.hf.MMPretrainConfig)
    ref = inference.load(exp, "cpu")
    model = AutoModel.from_pretrained(exp)
    assert isinstance(model, mmpretrain.hf.MMPretrainModel) and not model.training
    # the same file, the same keys: nothing renamed, nothing left over
    assert set(model.state_dict()) == set(load_file(str(exp / "model.safetensors")))
    # buffers transformers 5.x re-creates empty while loading (the mel filterbank, the window) are ours
    ref_bufs = dict(ref.model.named_buffers())
    for name, buf in model.named_buffers():
        torch.testing.assert_close(buf, ref_bufs[name], atol=0, rtol=0, msg=name)
    tok = AutoTokenizer.from_pretrained(exp)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    img, aud = _inputs(ref.cfg)
    enc = tok(TEXTS, max_length=ref.cfg.data.text_max_len, truncation=True, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        got = {"image": model.get_image_features(img), "audio": model.get_audio_features(aud),
               "text": model.get_text_features(**enc)}
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=img)
    want = {"image": ref.encode_image(img), "audio": ref.encode_audio(aud), "text": ref.encode_text(TEXTS)}
    for m in want:
        torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=0, msg=f"{m} embeddings differ")
    torch.testing.assert_close(out["logits_image_text"], ref.model.scale("image_text") * want["image"] @ want["text"].t(),
                               atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- CLIPModel


def test_clip_export_gives_our_embeddings_ids_and_pixels(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    run = fake_run(tmp_path / "run", "model.vision.stem=patch")
    exp = export(run, tmp_path / "exp")
    assert json.loads((exp / "config.json").read_text())["clip"] == "clip"
    clip_dir = exp / "clip"
    conf = json.loads((clip_dir / "config.json").read_text())
    assert conf["model_type"] == "clip" and conf["text_config"]["eos_token_id"] == 258
    ref = inference.load(exp, "cpu")  # the mmpretrain export beside it still loads
    model = CLIPModel.from_pretrained(clip_dir).eval()
    proc = CLIPProcessor.from_pretrained(clip_dir)
    L = ref.cfg.data.text_max_len
    enc = proc.tokenizer(TEXTS, max_length=L, truncation=True, padding="max_length", return_tensors="pt")
    assert torch.equal(enc["input_ids"], ref.tokenize(TEXTS)[0])
    img, _ = _inputs(ref.cfg)
    with torch.no_grad():
        got_i = _unit(model.get_image_features(pixel_values=img))
        got_t = _unit(model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
    torch.testing.assert_close(got_i, ref.encode_image(img), atol=1e-5, rtol=0)
    torch.testing.assert_close(got_t, ref.encode_text(TEXTS), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.logit_scale.exp(), ref.model.scale("image_text"))
    # the processor's resize + centre crop + normalisation is our eval decode: equal where the crop
    # falls on whole pixels; else (odd margins) its crop is up to half a pixel off ours
    rng = np.random.default_rng(0)
    noise = Image.fromarray((rng.random((40, 60, 3)) * 255).astype(np.uint8))
    pv = proc(images=[noise], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pv, ref.preprocess("image", [noise]), atol=1e-5, rtol=0)
    yy, xx = np.mgrid[0:50, 0:32]
    smooth = Image.fromarray(np.stack([yy * 5, xx * 7, (yy + xx) * 3], -1).astype(np.uint8))
    pv = proc(images=[smooth], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pv, ref.preprocess("image", [smooth]), atol=0.1, rtol=0)


def test_clip_export_of_transformers_clip_towers(tmp_path):
    """model.<tower>.kind=hf on CLIP text / vision directories: their weights go to the CLIPModel
    as they are (with our projections and EOS id); the tokenizer is the tower's."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import make_tiny_hf
    from transformers import CLIPModel, CLIPProcessor

    dirs = make_tiny_hf.make(tmp_path / "hf", ["clip_text", "clip_vision"], image_size=16)
    run = fake_run(tmp_path / "run", "model.text.kind=hf", f"model.text.hf_path={dirs['clip_text']}",
                   "model.vision.kind=hf", f"model.vision.hf_path={dirs['clip_vision']}")
    exp = export(run, tmp_path / "exp", clip="require")
    ref = inference.load(exp, "cpu")
    model = CLIPModel.from_pretrained(exp / "clip").eval()
    tok = CLIPProcessor.from_pretrained(exp / "clip").tokenizer
    texts = TEXTS[:3]
    enc = tok(texts, max_length=ref.cfg.data.text_max_len, truncation=True, padding="max_length", return_tensors="pt")
    assert torch.equal(enc["input_ids"], ref.tokenize(texts)[0])
    img, _ = _inputs(ref.cfg)
    with torch.no_grad():
        torch.testing.assert_close(_unit(model.get_image_features(pixel_values=img)), ref.encode_image(img),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(_unit(model.get_text_features(**enc)), ref.encode_text(texts), atol=1e-5, rtol=0)


def test_clip_require_refuses_a_conv_stem(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    rc = export_main(["--checkpoint", str(run), "--out", str(tmp_path / "exp"), "--clip", "require"])
    assert rc == 2 and "model.vision.stem='conv'" in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()
    rc = export_main(["--checkpoint", str(run), "--out", str(tmp_path / "exp"), "--clip", "off"])
    assert rc == 0 and "CLIPModel: not exported: not requested" in capsys.readouterr().out


# ----------------------------------------------------------------------------- card and modes


def test_clip_export_on_its_own_honours_the_umask(tmp_path, umask022):
    """export_clip.export_clip called directly (not through export()): safetensors writes 0600 and
    its directory is new, so it must set the modes a plain mkdir / open gives, like export()."""
    from mmpretrain import export_clip, loading

    run = fake_run(tmp_path / "run", "model.vision.stem=patch")
    out = export_clip.export_clip(loading.load(run), tmp_path / "clip_only" / "clip")
    entries = [out.parent, out, *out.rglob("*")]
    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= {p.name for p in entries}
    for p in entries:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))


def test_model_card_and_file_modes(tmp_path, umask022):
    evals = [{"kind": "eval", "step": 5, "retrieval": {"image_text": {"r@1": 0.25}}},
             {"kind": "train", "step": 7, "loss": 1.0},
             {"kind": "eval", "step": 7, "retrieval": {"image_text": {"r@1": 0.5}}, "zeroshot": {"image": {"top1": 0.75}}},
             {"kind": "eval", "step": 9, "retrieval": {"image_text": {"r@1": 0.9}}}]  # after the exported step
    run = fake_run(tmp_path / "run", "model.vision.stem=patch", evals=evals)
    exp = export(run, tmp_path / "exp")
    card = (exp / "README.md").read_text()
    for want in ("| image | native | 16 | 1 | 2 | VisionTransformer, stem patch, patch_size 8; input (3, 16, 16) |",
                 "Shared embedding dimension 16", "step 7, samples seen 56",
                 "`tiny` (weight 1.0): `data/tiny/train/train-{000000..000003}.tar`",
                 "at step 7", "| retrieval/image_text/r@1 | 0.5 |", "| zeroshot/image/top1 | 0.75 |",
                 "## Intended use", "inference.load", "AutoModel.from_pretrained", "CLIPModel.from_pretrained"):
        assert want in card, want
    assert "0.9" not in card
    for p in [exp, *exp.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o755 if p.is_dir() else 0o644), (p, oct(mode))
    assert {"README.md", "clip", "tokenizer", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in exp.iterdir()}
    # a step directory of the run finds the run's metrics too; without them: none recorded
    exp2 = export(run / "checkpoints" / tag_for(7), tmp_path / "exp2", clip="off")
    assert "at step 7" in (exp2 / "README.md").read_text()
    (run / "metrics.jsonl").unlink()
    exp3 = export(run, tmp_path / "exp3", clip="off")
    card3 = (exp3 / "README.md").read_text()
    assert "None recorded" in card3 and "No CLIPModel export: not requested" in card3
