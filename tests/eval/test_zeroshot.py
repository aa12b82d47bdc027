"""Zero-shot classification: template averaging by hand, metrics against scikit-learn, and
class-name discovery."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

from mmpretrain.data.tokenizer import ByteTokenizer
from mmpretrain.eval.zeroshot import class_embeddings, load_class_names, zeroshot_predict, zeroshot_report


class PromptModel:
    """encode_text: a fixed random unit vector per distinct prompt (looked up by its bytes)."""

    def __init__(self, dim=8):
        self.dim, self.table = dim, {}

    def vec(self, prompt):
        if prompt not in self.table:
            g = torch.Generator().manual_seed(sum(ord(c) * 31 ** i for i, c in enumerate(prompt)) % 2**31)
            self.table[prompt] = F.normalize(torch.randn(self.dim, generator=g), dim=0) * 3.0  # not unit on purpose
        return self.table[prompt]

    def encode_text(self, ids, lens):
        tok = ByteTokenizer()
        return torch.stack([self.vec(tok.decode(ids[i, 1: lens[i] - 1].tolist())) for i in range(ids.shape[0])])


def test_class_embeddings_average_normalized_prompts():
    model = PromptModel()
    names, templates = ["red circle", "blue square"], ["{}", "a photo of {}", "a {} shape"]
    got = class_embeddings(model, ByteTokenizer(), names, templates, 32, torch.device("cpu"), batch_size=2)
    for c, name in enumerate(names):
        vs = [F.normalize(model.vec(t.replace("{}", name)), dim=0) for t in templates]
        want = F.normalize(torch.stack(vs).mean(0), dim=0)
        torch.testing.assert_close(got[c], want)


def test_zeroshot_metrics_match_sklearn():
    g = torch.Generator().manual_seed(0)
    C, N = 5, 200
    cls = F.normalize(torch.randn(C, 16, generator=g), dim=-1)
    labels = torch.randint(0, C, (N,), generator=g)
    emb = {"image": cls[labels] + 0.9 * torch.randn(N, 16, generator=g),  # noisy: some mistakes
           "audio": cls[labels] + 2.0 * torch.randn(N, 16, generator=g)}
    masks = {"image": torch.ones(N, dtype=torch.bool), "audio": torch.rand(N, generator=g) > 0.3}
    rep = zeroshot_report(emb, masks, labels, cls)
    for m in ("image", "audio"):
        keep = masks[m]
        y = labels[keep].numpy()
        pred = zeroshot_predict(emb[m][keep], cls).argmax(1).numpy()
        assert 0.2 < accuracy_score(y, pred) < 1.0  # neither trivial nor perfect
        assert rep[m]["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert rep[m]["macro_recall"] == pytest.approx(recall_score(y, pred, average="macro", zero_division=0))
        assert rep[m]["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
        assert rep[m]["confusion_matrix"] == confusion_matrix(y, pred, labels=list(range(C))).tolist()
        assert rep[m]["num_samples"] == int(keep.sum())
    # cosine, not dot product: scaling a query does not change its class
    scaled = zeroshot_predict(emb["image"] * 7.0, cls).argmax(1)
    assert torch.equal(scaled, zeroshot_predict(emb["image"], cls).argmax(1))


def test_unlabelled_samples_are_left_out():
    cls = torch.eye(3)
    emb = {"image": torch.eye(3)[[0, 1, 2, 2]]}
    labels = torch.tensor([0, 1, -1, 2])
    rep = zeroshot_report(emb, {"image": torch.ones(4, dtype=torch.bool)}, labels, cls)
    assert rep["image"]["num_samples"] == 3 and rep["image"]["accuracy"] == 1.0


def test_load_class_names(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b"]))
    assert load_class_names(None, str(tmp_path / "eval" / "eval-000000.tar")) == ["a", "b"]
    (tmp_path / "c.json").write_text(json.dumps({"classes": ["x", "y", "z"]}))
    assert load_class_names(str(tmp_path / "c.json")) == ["x", "y", "z"]
    (tmp_path / "c.txt").write_text("dog\n\ncat\n")
    assert load_class_names(str(tmp_path / "c.txt")) == ["dog", "cat"]
    with pytest.raises(FileNotFoundError):
        load_class_names(str(tmp_path / "missing.json"))
    assert load_class_names(None, str(tmp_path / "elsewhere" / "x" / "s.tar")) is None
    np.testing.assert_equal(load_class_names(None, None), None)
