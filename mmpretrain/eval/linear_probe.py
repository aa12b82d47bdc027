"""Linear probes on frozen embeddings: multinomial logistic regression (L-BFGS, the objective
of scikit-learn's LogisticRegression) on one modality or on image+audio fused by
concatenation or by a learned attention pooling that also handles a missing modality."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmpretrain.eval.metrics import classification_metrics


def stratified_split(labels: Sequence[int], test_fraction: float = 0.5, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx): per class, a seeded shuffle sends round(test_fraction * n) to test
    (at least one sample to each side when the class has two or more)."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    tr: List[int] = []
    te: List[int] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(test_fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        te += idx[:k].tolist()
        tr += idx[k:].tolist()
    return np.sort(np.array(tr, dtype=np.int64)), np.sort(np.array(te, dtype=np.int64))


def group_split(labels: Sequence[int], groups: Sequence[int], test_fraction: float = 0.5,
                seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx) with all items of a group on the same side, so that copies of an
    item (which share its group) are never trained on and scored. The groups are split by
    `stratified_split` on each group's most common label (ties: the smaller; -1 when it has no
    label); items without a group (-1) go to neither side."""
    y, g = np.asarray(labels, dtype=np.int64), np.asarray(groups, dtype=np.int64)
    keep = np.flatnonzero(g >= 0)
    uniq, inv = np.unique(g[keep], return_inverse=True)
    glab = np.full(len(uniq), -1, dtype=np.int64)
    lab = y[keep]
    has = lab >= 0
    if has.any():  # per group the (label, count) pairs; the most common label, smallest on ties
        pairs, counts = np.unique(np.stack([inv[has], lab[has]], 1), axis=0, return_counts=True)
        order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))
        first = order[np.r_[True, pairs[order[1:], 0] != pairs[order[:-1], 0]]]
        glab[pairs[first, 0]] = pairs[first, 1]
    _, gte = stratified_split(glab.tolist(), test_fraction, seed)
    side = np.zeros(len(uniq), dtype=bool)
    side[gte] = True  # True: the group is scored
    in_test = side[inv]
    return np.sort(keep[~in_test]), np.sort(keep[in_test])


def _lbfgs(params: List[torch.Tensor], closure, max_iter: int) -> None:
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    opt.step(closure)


class LogisticProbe(nn.Module):
    """softmax(x W^T + b); fit() minimises mean CE + l2 / 2 * ||W||^2 (bias not penalised),
    i.e. scikit-learn's LogisticRegression with C = 1 / (l2 * N)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes).double()
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.double())

    def fit(self, x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, max_iter: int = 500) -> "LogisticProbe":
        x, y = x.double(), y.long()

        def closure():
            self.zero_grad()
            loss = F.cross_entropy(self(x), y) + 0.5 * l2 * self.linear.weight.square().sum()
            loss.backward()
            return loss

        _lbfgs(list(self.parameters()), closure, max_iter)
        return self


class AttentionFusionProbe(nn.Module):
    """Fuses M modality embeddings (N, M, D) with a learned query: weights = softmax over the
    present modalities of q . (x_m + e_m) / sqrt(D), pooled = sum_m w_m x_m, then a linear
    classifier. A sample missing a modality simply pools over the others."""

    def __init__(self, dim: int, num_modalities: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.query = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64) * 0.01)
        self.modality = nn.Parameter(torch.zeros(num_modalities, dim, dtype=torch.float64))
        self.linear = nn.Linear(dim, num_classes).double()
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def weights(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = (x.double() + self.modality) @ self.query / x.shape[-1] ** 0.5  # (N, M)
        if mask is None:
            return s.softmax(-1)
        m = mask.bool()
        w = s.masked_fill(~m, float("-inf")).softmax(-1)
        return torch.where(m.any(-1, keepdim=True), w, torch.zeros_like(w))  # no modality: pools to 0

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = self.weights(x, mask)
        return self.linear((w[..., None] * x.double()).sum(1))

    def fit(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None, l2: float = 1e-3,
            max_iter: int = 500) -> "AttentionFusionProbe":
        y = y.long()

        def closure():
            self.zero_grad()
            reg = self.linear.weight.square().sum() + self.modality.square().sum()
            loss = F.cross_entropy(self(x, mask), y) + 0.5 * l2 * reg
            loss.backward()
            return loss

        _lbfgs(list(self.parameters()), closure, max_iter)
        return self


def linear_probe_report(embeddings: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], labels: torch.Tensor,
                        num_classes: int, train_idx: np.ndarray, test_idx: np.ndarray, l2: float = 1e-3,
                        fuse: Sequence[str] = ()) -> Dict[str, Dict[str, object]]:
    """Probes trained on `train_idx`, scored on `test_idx` (samples with a label in [0, C)):
    one per modality in `embeddings`, and for the `fuse` pair `<a>+<b>/concat` (samples having
    both) and `<a>+<b>/attention` (samples having either; also reports the mean attention weights)."""
    y = labels.cpu().long()
    ok = (y >= 0) & (y < num_classes)
    tr = torch.zeros(len(y), dtype=torch.bool)
    te = torch.zeros(len(y), dtype=torch.bool)
    tr[torch.as_tensor(train_idx, dtype=torch.long)] = True
    te[torch.as_tensor(test_idx, dtype=torch.long)] = True
    out: Dict[str, Dict[str, object]] = {}

    def run(name: str, keep: torch.Tensor, fit_pred) -> None:
        a, b = tr & ok & keep, te & ok & keep
        if a.sum() < 2 or b.sum() < 1:
            return
        pred, extra = fit_pred(a, b)
        res = classification_metrics(pred, y[b], num_classes)
        res.update(num_train=int(a.sum()), **extra)
        out[name] = res

    for m, e in embeddings.items():
        x = e.cpu().double()
        run(m, masks[m].bool().cpu(), lambda a, b, x=x: (
            LogisticProbe(x.shape[1], num_classes).fit(x[a], y[a], l2)(x[b]).argmax(1), {}))
    if len(fuse) >= 2 and all(m in embeddings for m in fuse):
        xs = torch.stack([embeddings[m].cpu().double() for m in fuse], 1)  # (N, M, D)
        mk = torch.stack([masks[m].bool().cpu() for m in fuse], 1)  # (N, M)
        cat = xs.flatten(1)
        run("+".join(fuse) + "/concat", mk.all(1), lambda a, b: (
            LogisticProbe(cat.shape[1], num_classes).fit(cat[a], y[a], l2)(cat[b]).argmax(1), {}))

        def attn(a, b):
            probe = AttentionFusionProbe(xs.shape[2], len(fuse), num_classes).fit(xs[a], y[a], mk[a], l2)
            with torch.no_grad():
                w = probe.weights(xs[b], mk[b]).mean(0)
                pred = probe(xs[b], mk[b]).argmax(1)
            return pred, {"attention_weights": {m: float(w[i]) for i, m in enumerate(fuse)}}

        run("+".join(fuse) + "/attention", mk.any(1), attn)
    return out
