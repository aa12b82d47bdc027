"""A fourth modality from this file alone: "depth" (a grey-scale map stored as `<key>.depth.png`),
its own small tower, its pairs with every other modality; registered by one call (`register`,
loaded in the training processes through `run.plugins`), trained under DeepSpeed with 2
processes, resumed from its checkpoint. No package file knows about it."""
from __future__ import annotations

import io
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from PIL import Image

from mmpretrain import modalities
from mmpretrain.config import load_config
from mmpretrain.data.decode import DecodeError

sys.path.insert(0, str(Path(__file__).parent))
import trainkit as tk  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def decode_depth(data: bytes, data_cfg, rng) -> np.ndarray:
    """PNG bytes -> (1, S, S) float32 in [0, 1], S = data.image_size (no augmentation)."""
    try:
        img = Image.open(io.BytesIO(data)).convert("L").resize((data_cfg.image_size,) * 2, Image.BILINEAR)
    except Exception as e:  # noqa: BLE001 - any unreadable map is a skipped sample
        raise DecodeError("depth_decode", f"{type(e).__name__}: {e}") from None
    return (np.asarray(img, dtype=np.float32) / 255.0)[None]


class DepthTower(nn.Module):
    """Strided convs to a 4x4 grid of tokens; pooled = mean token (the tower interface)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.net = nn.Sequential(nn.Conv2d(1, width, 4, stride=4), nn.GELU(), nn.Conv2d(width, width, 2, stride=2))
        self.ln = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor):
        tokens = self.ln(self.net(x.float()).flatten(2).transpose(1, 2))  # (B, N, W)
        return tokens.mean(1), tokens


DEPTH = modalities.Modality(
    name="depth", member_keys="depth.png", decode=decode_depth, aug_stream=3,
    sample_shape=lambda d: (1, d.image_size, d.image_size),
    towers={"native": lambda cfg, vocab: DepthTower(cfg.model.vision.width)},
)


def register() -> None:
    """The one registration call (a `run.plugins` entry: tests.test_fourth_modality:register)."""
    modalities.register(DEPTH)


def add_depth(src: Path, dst: Path) -> None:
    """Copy a demo shard, adding `<key>.depth.png`: the image's luminance, inverted and blurred by a
    downscale (a second view of the same scene, so depth-text and image-depth pairs are learnable)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            tout.addfile(m, io.BytesIO(data))
            key, _, ext = m.name.partition(".")
            if ext in ("png", "jpg"):
                g = Image.open(io.BytesIO(data)).convert("L").resize((16, 16))
                g = Image.fromarray(255 - np.asarray(g))
                buf = io.BytesIO()
                g.save(buf, format="PNG")
                info = tarfile.TarInfo(f"{key}.depth.png")
                info.size = len(buf.getvalue())
                tout.addfile(info, io.BytesIO(buf.getvalue()))


@pytest.fixture(scope="module")
def depth_data(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("depth_data")
    (out / "train").mkdir()
    for src in sorted((tiny_data / "train").glob("train-*.tar")):
        add_depth(src, out / "train" / src.name)
    (out / "train" / "sizes.json").write_text((tiny_data / "train" / "sizes.json").read_text())
    return out


def test_registered_modality_flows_through_data_model_and_loss(depth_data):
    with modalities.registered(DEPTH):
        assert modalities.pair_names() == ["image_text", "audio_text", "depth_text", "image_audio", "image_depth",
                                           "audio_depth"]
        cfg = load_config(str(REPO / "configs/tiny_test.yaml"), [
            f"data.train=[{{name: d, urls: '{depth_data}/train/train-{{000000..000003}}.tar'}}]",
            "data.num_workers=0", "loss.pairs.image_depth=0.5"])
        from mmpretrain.data import build_tokenizer, build_train_loader
        from mmpretrain.engine import TrainModule
        from mmpretrain.models import build_model

        tok = build_tokenizer(cfg.data.tokenizer)
        batch = next(build_train_loader(cfg, 0, 1, tok))
        assert batch.inputs["depth"].shape[1:] == (1, cfg.data.image_size, cfg.data.image_size)
        assert torch.equal(batch.masks["depth"], batch.masks["image"])  # every image got a depth map
        model = build_model(cfg, tok.vocab_size)
        assert isinstance(model.towers["depth"], DepthTower)
        loss, metrics = TrainModule(model, cfg)(batch)
        for p in ("depth_text", "image_depth", "audio_depth"):
            assert float(metrics[f"pairs/{p}"]) > 0 and torch.isfinite(metrics[f"loss/{p}"])
        loss.backward()
        assert model.towers["depth"].net[0].weight.grad.abs().sum() > 0
        assert model.encode_depth(batch.inputs["depth"]).shape == (len(batch), cfg.model.embed_dim)
    assert "depth" not in modalities.names()  # nothing leaks into other tests
    with pytest.raises(Exception, match="unknown pairs"):
        load_config(None, ["loss.pairs.image_depth=1"])


@pytest.mark.distributed
def test_fourth_modality_trains_under_deepspeed_and_resumes(depth_data, tmp_path):
    # DeepSpeed's engine under torchrun (the deepspeed launcher itself: tests/launch, preemption tests)
    out = tmp_path / "run"
    over = tk.tiny_overrides(out, depth_data, "run.plugins=[tests.test_fourth_modality:register]", "train.steps=5",
                             "train.save_every=0", "optim.warmup_steps=1", "loss.caption_weight=0")
    log = tmp_path / "train.log"
    assert tk.run("torchrun", 2, over, log) == 0, log.read_text()[-4000:]
    rows = tk.train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["pairs/depth_text"] > 0 for r in rows)
    ckpt = out / "checkpoints" / "step_00000005"
    assert (ckpt / "COMPLETE").exists()
    weights = tk.final_weights(out)
    assert any(k.startswith("towers.depth.") for k in weights)
    # the loss falls: on the same two training batches, the trained weights beat the initial ones
    # (per-step losses of 5 steps on different batches are too noisy to compare)
    with modalities.registered(DEPTH):
        saved = yaml.safe_load((out / "config.yaml").read_text())
        saved["run"]["plugins"] = []  # registered above, in this process
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(saved))
        cfg = load_config(str(tmp_path / "cfg.yaml"))
        from mmpretrain.data import build_tokenizer, build_train_loader
        from mmpretrain.engine import TrainModule
        from mmpretrain.models import build_model
        from mmpretrain.trainer import seed_everything

        tok = build_tokenizer(cfg.data.tokenizer)
        loader = build_train_loader(cfg, 0, 1, tok)
        batches = [next(loader) for _ in range(2)]
        loader.close()
        seed_everything(cfg.run.seed)  # the run's initial weights
        model = build_model(cfg, tok.vocab_size).eval()
        with torch.no_grad():
            before = [float(TrainModule(model, cfg)(b)[1]["loss/contrastive"]) for b in batches]
            model.load_state_dict(weights)
            after = [float(TrainModule(model, cfg)(b)[1]["loss/contrastive"]) for b in batches]
            depth_before_after = [float(TrainModule(model, cfg)(b)[1]["loss/depth_text"]) for b in batches]
    assert sum(after) < sum(before), (before, after)
    assert all(np.isfinite(depth_before_after))
    # the checkpoint resumes: two more steps continue from step 5
    over2 = [o for o in over if not o.startswith("train.steps=")] + ["train.steps=7"]
    log2 = tmp_path / "resume.log"
    assert tk.run("torchrun", 2, over2, log2) == 0, log2.read_text()[-4000:]
    assert re.search(r"resumed from .*step_00000005", log2.read_text())
    assert [r["step"] for r in tk.train_rows(out)][-2:] == [6, 7]
