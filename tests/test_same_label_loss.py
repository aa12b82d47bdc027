"""loss.same_label (issue 16): other samples of a row's class are negatives in CLIP's loss. 'ignore'
leaves them out of the softmax, 'positive' pulls them in as positives (UniCL). Checked against a
float64 loop over the definitions; with no shared label both equal the plain loss."""
import math

import pytest
import torch

from mmpretrain.config import ConfigError, load_config
from mmpretrain.losses import ContrastiveLoss
from mmpretrain.ops.contrastive import contrastive_rows_naive, contrastive_rows_same_label

N, D = 10, 6


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 1, 0, 2, -1, 1, 0, -1, 2, 3])
    col_valid = torch.ones(N, dtype=torch.bool)
    col_valid[5] = False  # an absent partner: neither a column nor a row
    targets = torch.where(col_valid, torch.arange(N), torch.full((N,), -1))
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    return q.requires_grad_(), k.requires_grad_(), labels, col_valid, targets, same


def _loop(q, k, scale, labels, col_valid, targets, mode):
    out = []
    for i in range(N):
        if targets[i] < 0:
            out.append(torch.zeros((), dtype=q.dtype))
            continue
        cols = [j for j in range(N) if col_valid[j]]
        same = [j for j in cols if j == i or (labels[i] >= 0 and labels[j] == labels[i])]
        s = {j: scale * (q[i] @ k[j]) for j in cols}
        if mode == "ignore":
            kept = [j for j in cols if j == i or j not in same]
            out.append(torch.logsumexp(torch.stack([s[j] for j in kept]), 0) - s[i])
        else:
            lse = torch.logsumexp(torch.stack([s[j] for j in cols]), 0)
            out.append(lse - sum(s[j] for j in same) / len(same))
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["ignore", "positive"])
def test_rows_and_gradients_match_the_definition(mode):
    q, k, labels, col_valid, targets, same = _inputs()
    got = contrastive_rows_same_label(q, k, torch.tensor(5.0, dtype=torch.float64), targets, col_valid, same, mode)
    gq, gk = torch.autograd.grad(got.sum(), (q, k))
    want = _loop(q, k, 5.0, labels, col_valid, targets, mode)
    wq, wk = torch.autograd.grad(want.sum(), (q, k))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(gq, wq, rtol=0, atol=1e-12)
    torch.testing.assert_close(gk, wk, rtol=0, atol=1e-12)
    plain = contrastive_rows_naive(q, k, torch.tensor(5.0, dtype=torch.float64), targets, col_valid)
    differs = (got - plain).abs() > 1e-9
    shares = (same & col_valid[None, :]).sum(1) > 1
    assert torch.equal(differs, shares & (targets >= 0))  # exactly the rows with a classmate in the batch


@pytest.mark.parametrize("mode", ["ignore", "positive"])
def test_no_shared_label_is_the_plain_loss(mode):
    q, k, _, col_valid, targets, _ = _inputs(1)
    labels = torch.tensor([0, 1, 2, 3, -1, -1, 4, 5, 6, 7])
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    scale = torch.tensor(3.0, dtype=torch.float64)
    torch.testing.assert_close(contrastive_rows_same_label(q, k, scale, targets, col_valid, same, mode),
                               contrastive_rows_naive(q, k, scale, targets, col_valid), rtol=0, atol=1e-12)


def test_the_loss_reads_the_labels():
    """Two classes of five, each class collapsed on one point, pairs aligned. CLIP's loss stays at
    ln 5 (four classmates as close as the partner are negatives); 'ignore' is at 0; 'positive' is at
    its floor, the entropy ln 5 of its uniform target over the five positives, with zero gradient."""
    u, v = torch.eye(D)[0], torch.eye(D)[1]
    labels = torch.tensor([0, 1] * 5)
    emb = torch.stack([u if int(c) == 0 else v for c in labels]).requires_grad_()
    scales = {p: torch.tensor(50.0) for p in ("image_text", "audio_text", "image_audio")}
    biases = {p: torch.tensor(-10.0) for p in scales}
    masks = {m: torch.ones(N, dtype=torch.bool) for m in ("image", "text", "audio")}
    res = {}
    for mode in ("negative", "ignore", "positive"):
        loss_fn = ContrastiveLoss(load_config(None, [f"loss.same_label={mode}", "loss.pairs.audio_text=0",
                                                     "loss.pairs.image_audio=0"]))
        loss, metrics = loss_fn({"image": emb, "text": emb * 1, "audio": emb * 1}, scales, biases, masks, labels)
        res[mode] = float(metrics["loss/image_text"])
        if mode == "positive":
            (g,) = torch.autograd.grad(loss, emb)
            assert float(g.abs().max()) < 1e-4  # float32; the other class adds e^-50 terms
    assert res["negative"] == pytest.approx(math.log(5), rel=1e-5)
    assert res["ignore"] < 1e-5
    assert res["positive"] == pytest.approx(math.log(5), rel=1e-5)
    with pytest.raises(ValueError, match="needs the batch's labels"):
        ContrastiveLoss(load_config(None, ["loss.same_label=positive"]))({"image": emb, "text": emb, "audio": emb},
                                                                         scales, biases, masks)


@pytest.mark.parametrize("override,named", [
    ("loss.kind=siglip", "loss.kind='siglip'"),
    ("loss.impl=tiled", "loss.impl='tiled'"),
    ("loss.feature_cache=true", "loss.feature_cache=True"),
])
def test_refused_where_it_is_not_implemented(override, named):
    with pytest.raises(ConfigError, match="loss.same_label") as e:
        load_config(None, ["loss.same_label=positive", override])
    assert named in str(e.value)
    with pytest.raises(ConfigError, match="loss.same_label"):
        load_config(None, ["loss.same_label=sometimes"])
