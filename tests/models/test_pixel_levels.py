"""Images travel as 8-bit levels (a quarter of float32's worker, shared-memory and host -> device
bytes; issue 15's P2) and the model normalises them on its device: the same numbers as the
float32 normalisation the data pipeline used to do, for every level, in float32 and bf16."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import fake_batch, tiny_cfg  # noqa: E402

from mmpretrain import modalities as M  # noqa: E402
from mmpretrain.config import DataConfig  # noqa: E402
from mmpretrain.data.decode import CLIP_MEAN, CLIP_STD  # noqa: E402
from mmpretrain.models import build_model  # noqa: E402

OWN_STATS = ([0.5, 0.25, 0.75], [0.2, 0.5, 0.3])


def _reference(levels: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(CLIP_MEAN if mean is None else mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(CLIP_STD if std is None else std, dtype=torch.float64).view(1, 3, 1, 1)
    return (levels.double() / 255.0 - m) / s


def test_every_level_maps_to_the_normalised_value():
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16).contiguous()
    for mean, std in ((None, None), OWN_STATS):
        d = DataConfig()
        d.image_mean, d.image_std = mean, std
        x = M.to_model_input(M.get("image"), levels, d)
        assert x.dtype == torch.float32 and x.shape == levels.shape
        assert float((x.double() - _reference(levels, mean, std)).abs().max()) < 1e-6
        bf = M.to_model_input(M.get("image"), levels, d, torch.bfloat16)
        assert bf.dtype == torch.bfloat16 and torch.equal(bf, x.to(torch.bfloat16))
    floats = torch.randn(2, 3, 4, 4)  # model input already: passed through untouched
    assert M.to_model_input(M.get("image"), floats, DataConfig()) is floats


def _levels_batch(cfg, n: int):
    b = fake_batch(cfg, n, drop=("image",))  # odd rows have no image
    g = torch.Generator().manual_seed(5)
    b.inputs["image"] = torch.randint(0, 256, b.inputs["image"].shape, generator=g, dtype=torch.uint8)
    b.inputs["image"][~b.masks["image"]] = 0
    return b


def test_model_on_levels_equals_model_on_normalised_pixels():
    """Forward and gradients of a batch of uint8 images (absent rows included) equal those of the same
    batch normalised on the host, as the pipeline used to send it."""
    cfg = tiny_cfg(f"data.image_mean={OWN_STATS[0]}", f"data.image_std={OWN_STATS[1]}")
    torch.manual_seed(0)
    model = build_model(cfg, 259)
    b = _levels_batch(cfg, 6)
    ref_batch = fake_batch(cfg, 6, drop=("image",))
    ref_batch.inputs = dict(b.inputs, image=_reference(b.inputs["image"], *OWN_STATS).float())
    outs, grads = [], []
    for batch in (b, ref_batch):
        model.zero_grad()
        out = model(batch)
        loss = sum((e * e.roll(1, 0)).sum() for e in out.embeddings.values())
        loss.backward()
        outs.append(out.embeddings["image"].detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.towers["image"].parameters()]))
    assert b.inputs["image"].dtype == torch.uint8
    assert float((outs[0] - outs[1]).abs().max()) < 1e-6
    assert float((grads[0] - grads[1]).abs().max()) < 1e-6 * max(1.0, float(grads[1].abs().max()))


def test_bf16_batches_keep_levels_until_the_model():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg, 259).to(torch.bfloat16)
    b = _levels_batch(cfg, 4).to(torch.device("cpu"), torch.bfloat16)
    assert b.inputs["image"].dtype == torch.uint8 and b.inputs["audio"].dtype == torch.float32  # audio keeps fp32
    with torch.no_grad():
        got = model.encode("image", b.inputs["image"])
        want = model.encode("image", _reference(b.inputs["image"], None, None).float().to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
