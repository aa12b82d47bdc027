"""classification_metrics against scikit-learn on random cases (absent classes included)."""
import numpy as np
import pytest
import torch

from mmpretrain.eval import classification_metrics

sk = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", range(25))
def test_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(2, 10))
    n = int(rng.integers(1, 60))
    # draw from a random subset so some classes are absent from target, pred or both
    pool_t = rng.choice(c, size=int(rng.integers(1, c + 1)), replace=False)
    pool_p = rng.choice(c, size=int(rng.integers(1, c + 1)), replace=False)
    t = rng.choice(pool_t, n)
    p = np.where(rng.uniform(size=n) < 0.5, t, rng.choice(pool_p, n))
    m = classification_metrics(torch.from_numpy(p), t, c)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(t, p))
    assert m["macro_recall"] == pytest.approx(sk.recall_score(t, p, average="macro", zero_division=0))
    assert m["macro_precision"] == pytest.approx(sk.precision_score(t, p, average="macro", zero_division=0))
    assert m["macro_f1"] == pytest.approx(sk.f1_score(t, p, average="macro", zero_division=0))
    assert m["confusion_matrix"] == sk.confusion_matrix(t, p, labels=list(range(c))).tolist()
    assert m["num_present_classes"] == len(set(t) | set(p)) and m["num_samples"] == n


def test_scores_input_and_hand_case():
    target = [0, 0, 1, 2]
    logits = torch.tensor([[2.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 5.0]])  # -> 0, 1, 1, 3
    m = classification_metrics(logits, target, 5)
    assert m["accuracy"] == 0.5
    # present classes 0, 1, 2, 3 (4 absent everywhere): recall 1/2, 1, 0, 0; precision 1, 1/2, 0, 0
    assert m["macro_recall"] == pytest.approx(1.5 / 4) and m["macro_precision"] == pytest.approx(1.5 / 4)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 4)
    assert m["confusion_matrix"][0] == [1, 1, 0, 0, 0] and m["confusion_matrix"][2] == [0, 0, 0, 1, 0]


def test_bad_inputs():
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0], 2)
    with pytest.raises(ValueError):
        classification_metrics([0, 2], [0, 1], 2)
    with pytest.raises(ValueError):
        classification_metrics([], [], 2)
