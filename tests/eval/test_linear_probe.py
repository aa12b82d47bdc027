"""Linear probes: the logistic regression equals scikit-learn's solution; the attention fusion
learns to weight the informative modality and survives missing ones; metrics vs sklearn."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, recall_score

from mmpretrain.eval.linear_probe import AttentionFusionProbe, LogisticProbe, linear_probe_report, stratified_split


def _data(n=240, d=8, c=4, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = rng.normal(size=(d, c))
    y = (x @ w + noise * rng.normal(size=(n, c))).argmax(1)
    return x, y


@pytest.mark.parametrize("l2", [1e-1, 1e-3])
def test_logistic_probe_equals_sklearn(l2):
    x, y = _data()
    n = len(y)
    ours = LogisticProbe(x.shape[1], 4).fit(torch.tensor(x), torch.tensor(y), l2=l2)
    sk = LogisticRegression(C=1.0 / (l2 * n), tol=1e-10, max_iter=20000).fit(x, y)
    np.testing.assert_allclose(ours.linear.weight.detach().numpy(), sk.coef_, atol=2e-4)
    xt, _ = _data(seed=1)
    assert (ours(torch.tensor(xt)).argmax(1).numpy() == sk.predict(xt)).mean() == 1.0


def test_stratified_split():
    y = [0] * 10 + [1] * 7 + [2] * 2 + [3]
    tr, te = stratified_split(y, 0.5, seed=3)
    assert sorted(tr.tolist() + te.tolist()) == list(range(len(y)))
    ya = np.array(y)
    assert [int((ya[te] == c).sum()) for c in range(4)] == [5, 4, 1, 0]  # round(3.5) = 4 (banker's), >=1 each side
    assert [int((ya[tr] == c).sum()) for c in range(4)] == [5, 3, 1, 1]
    tr2, te2 = stratified_split(y, 0.5, seed=3)
    assert np.array_equal(te, te2)


def test_attention_fusion_prefers_informative_modality_and_handles_missing():
    rng = np.random.default_rng(0)
    n, d, c = 300, 8, 3
    y = rng.integers(0, c, n)
    protos = rng.normal(size=(c, d)) * 2
    img = protos[y] + 0.5 * rng.normal(size=(n, d))
    aud = rng.normal(size=(n, d)) * 2  # pure noise
    xs = torch.tensor(np.stack([img, aud], 1))
    mask = torch.ones(n, 2, dtype=torch.bool)
    mask[::5, 1] = False  # some samples lack audio
    mask[1::7, 0] = False  # a few lack the image (then only noise is left) ...
    mask[1::7, 1] = True  # ... but have audio
    mask[2, :] = False  # one has neither: pools to zero, no NaN
    tr, te = np.arange(0, 200), np.arange(200, n)
    probe = AttentionFusionProbe(d, 2, c).fit(xs[tr], torch.tensor(y[tr]), mask[tr], l2=1e-3)
    with torch.no_grad():
        w = probe.weights(xs[te], mask[te])
        pred = probe(xs[te], mask[te]).argmax(1).numpy()
    both = mask[te].all(1)
    with torch.no_grad():
        assert torch.isfinite(probe(xs[:5], mask[:5])).all() and float(probe.weights(xs[:5], mask[:5])[2].sum()) == 0.0
    assert float(w[both, 0].mean()) > 0.8  # the informative image embedding dominates
    assert torch.equal(w[~mask[te][:, 1], 0], torch.ones(int((~mask[te][:, 1]).sum()), dtype=w.dtype))
    has_img = mask[te][:, 0].numpy()
    assert (pred[has_img] == y[te][has_img]).mean() > 0.9


def test_report_metrics_match_sklearn_and_fusion_keys():
    x, y = _data(n=200, d=6, c=3, noise=0.2)
    rng = np.random.default_rng(1)
    emb = {"image": torch.tensor(x, dtype=torch.float32), "audio": torch.tensor(rng.normal(size=x.shape), dtype=torch.float32)}
    masks = {"image": torch.ones(200, dtype=torch.bool), "audio": torch.ones(200, dtype=torch.bool)}
    masks["audio"][:20] = False
    labels = torch.tensor(y)
    tr, te = stratified_split(y, 0.5, seed=0)
    rep = linear_probe_report(emb, masks, labels, 3, tr, te, l2=1e-3, fuse=("image", "audio"))
    assert set(rep) == {"image", "audio", "image+audio/concat", "image+audio/attention"}
    pred = LogisticProbe(6, 3).fit(emb["image"][tr], labels[tr], 1e-3)(emb["image"][te]).argmax(1).numpy()
    assert rep["image"]["accuracy"] == pytest.approx(accuracy_score(y[te], pred))
    assert rep["image"]["macro_recall"] == pytest.approx(recall_score(y[te], pred, average="macro"))
    assert rep["image"]["macro_f1"] == pytest.approx(f1_score(y[te], pred, average="macro"))
    assert rep["image"]["accuracy"] > 0.8 and rep["audio"]["accuracy"] < 0.6  # signal vs noise
    cat_n = int(masks["audio"][torch.as_tensor(te)].sum())
    assert rep["image+audio/concat"]["num_samples"] == cat_n  # concat needs both modalities
    assert rep["image+audio/attention"]["num_samples"] == len(te)  # attention pools whatever is present
