"""Contrastive loss vs a float64 reference written with explicit loops, masks included."""
import math

import pytest
import torch

from mmpretrain import modalities as M
from mmpretrain.config import load_config
from mmpretrain.losses import ContrastiveLoss

PAIR_MODALITIES = {p.name: (p.a, p.b) for p in M.pairs()}


def call(loss_fn, out, masks):
    """The loss takes embeddings, scales and biases as separate dicts; tests keep one flat dict."""
    emb = {k: v for k, v in out.items() if "/" not in k}
    scales = {k[6:]: v for k, v in out.items() if k.startswith("scale/")}
    biases = {k[5:]: v for k, v in out.items() if k.startswith("bias/")}
    return loss_fn(emb, scales, biases, masks)


def reference_pair_loss(a, b, scale, valid):
    """Symmetric InfoNCE over the rows/columns where `valid`, by plain loops."""
    idx = [i for i in range(len(valid)) if valid[i]]
    if len(idx) == 0:
        return 0.0
    total = 0.0
    for x, y in ((a, b), (b, a)):
        for i in idx:
            logits = [scale * float(x[i] @ y[j]) for j in idx]
            lse = math.log(sum(math.exp(l) for l in logits))
            total += lse - scale * float(x[i] @ y[i])
    return total / (2 * len(idx))


def make_out(n, d, seed, scale=5.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    out = {m: torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
           for m in ("image", "audio", "text")}
    for p in PAIR_MODALITIES:
        out[f"scale/{p}"] = torch.tensor(scale, dtype=dtype, requires_grad=True)
        out[f"bias/{p}"] = torch.tensor(-10.0, dtype=dtype, requires_grad=True)
    masks = {m: torch.rand(n, generator=g) > 0.3 for m in ("image", "audio", "text")}
    return out, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_infonce_matches_loop_reference_with_masks(seed):
    cfg = load_config(None, ["loss.pairs.image_text=1.0", "loss.pairs.audio_text=0.5", "loss.pairs.image_audio=2.0"])
    out, masks = make_out(12, 8, seed)
    out = {k: v for k, v in out.items()}
    loss_fn = ContrastiveLoss(cfg)
    # float64 path: the loss casts to float(); run the reference on the same float32 values
    total, metrics = call(loss_fn, out, masks)
    expected = 0.0
    for pair, w in (("image_text", 1.0), ("audio_text", 0.5), ("image_audio", 2.0)):
        a, b = PAIR_MODALITIES[pair]
        valid = (masks[a] & masks[b]).tolist()
        ref = reference_pair_loss(out[a].detach().float().double(), out[b].detach().float().double(), 5.0, valid)
        got = float(metrics[f"loss/{pair}"])
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-6), pair
        if sum(valid) >= cfg.loss.min_valid_pairs:
            expected += w * ref
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_gradient_matches_float64_autograd_reference():
    cfg = load_config(None, [])
    out, masks = make_out(10, 6, seed=3)
    total, _ = call(ContrastiveLoss(cfg), out, masks)
    total.backward()
    got = out["image"].grad.clone()
    # reference: same loss in float64 built from dense masked logits
    ref_in = {k: v.detach().clone().requires_grad_() for k, v in out.items() if k in ("image", "audio", "text")}
    ref_total = 0.0
    for pair in PAIR_MODALITIES:
        a, b = PAIR_MODALITIES[pair]
        valid = masks[a] & masks[b]
        A, B = ref_in[a][valid], ref_in[b][valid]
        logits = 5.0 * A @ B.t()
        tgt = torch.arange(A.shape[0])
        ref_total = ref_total + 0.5 * (torch.nn.functional.cross_entropy(logits, tgt) + torch.nn.functional.cross_entropy(logits.t(), tgt))
    ref_total.backward()
    torch.testing.assert_close(got, ref_in["image"].grad.to(got.dtype), rtol=1e-4, atol=1e-6)
    # rows without an image contribute no gradient to image features
    assert torch.all(got[~masks["image"]] == 0)


def test_missing_modality_never_becomes_a_negative():
    """Changing a feature of a sample without text must not change the image-text loss."""
    cfg = load_config(None, ["loss.pairs.audio_text=0", "loss.pairs.image_audio=0"])
    out, masks = make_out(8, 4, seed=5)
    masks["text"][:] = True
    masks["text"][3] = False
    l1, _ = call(ContrastiveLoss(cfg), out, masks)
    out2 = dict(out)
    out2["image"] = out["image"].detach().clone()
    out2["image"][3] = -out2["image"][3]
    l2, _ = call(ContrastiveLoss(cfg), out2, masks)
    assert float(l1) == pytest.approx(float(l2), rel=1e-7)


def test_too_few_pairs_contributes_zero_but_keeps_graph():
    cfg = load_config(None, ["loss.min_valid_pairs=3"])
    out, masks = make_out(6, 4, seed=7)
    masks["audio"][:] = False
    masks["audio"][0] = True
    total, metrics = call(ContrastiveLoss(cfg), out, masks)
    assert metrics["loss/audio_text"] == 0 and metrics["loss/image_audio"] == 0
    total.backward()
    assert out["audio"].grad is not None and torch.all(out["audio"].grad == 0)


def test_siglip_decreases_when_pairs_align():
    cfg = load_config(None, ["loss.kind=siglip"])
    out, masks = make_out(8, 16, seed=9, scale=10.0)
    base, _ = call(ContrastiveLoss(cfg), out, masks)
    aligned = dict(out)
    for m in ("audio", "text"):
        aligned[m] = out["image"].detach().clone()
    for p in PAIR_MODALITIES:
        aligned[f"bias/{p}"] = torch.tensor(-5.0, dtype=torch.float64)
    better, _ = call(ContrastiveLoss(cfg), aligned, masks)
    assert float(better) < float(base)
