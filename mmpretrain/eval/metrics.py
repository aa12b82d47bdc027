"""Classification metrics (accuracy, macro precision/recall/F1, confusion matrix) that match
scikit-learn's defaults: macro averages run over classes present in target or prediction.
"""
from __future__ import annotations

from typing import Dict, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray, list]


def _to_labels(x: ArrayLike, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 2:  # scores / logits (N, C): take the argmax class
        a = a.argmax(axis=1)
    if a.ndim != 1:
        raise ValueError(f"{name} must be (N,) labels or (N, C) scores, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.equal(np.mod(a, 1), 0)):
            raise ValueError(f"{name} holds non-integer labels")
    return a.astype(np.int64)


def classification_metrics(pred: ArrayLike, target: ArrayLike, num_classes: int) -> Dict[str, object]:
    """Metrics of predicted vs true class ids in [0, num_classes).

    pred: (N,) class ids or (N, C) scores (argmax taken). Returns accuracy, macro_precision,
    macro_recall, macro_f1 (floats in [0, 1]), confusion_matrix (num_classes x num_classes list of
    lists, rows = true class, columns = predicted class, as sklearn), num_samples and
    num_present_classes. Macro averages use the classes present in target or pred (sklearn's
    default `labels`); a present class never predicted has precision 0, one never true has
    recall 0 (sklearn's zero_division=0 result), F1 = 2 tp / (2 tp + fp + fn).
    """
    p, t = _to_labels(pred, "pred"), _to_labels(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target differ in length: {p.shape[0]} vs {t.shape[0]}")
    if p.size == 0:
        raise ValueError("no samples")
    for name, a in (("pred", p), ("target", t)):
        if a.min() < 0 or a.max() >= num_classes:
            raise ValueError(f"{name} has class ids outside [0, {num_classes}): min {a.min()}, max {a.max()}")
    cm = np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    tp = np.diag(cm).astype(np.float64)
    n_pred = cm.sum(axis=0).astype(np.float64)  # tp + fp
    n_true = cm.sum(axis=1).astype(np.float64)  # tp + fn
    present = (n_pred + n_true) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(n_pred > 0, tp / n_pred, 0.0)
        recall = np.where(n_true > 0, tp / n_true, 0.0)
        f1 = np.where(n_pred + n_true > 0, 2 * tp / (n_pred + n_true), 0.0)
    return {
        "accuracy": float(tp.sum() / p.size),
        "macro_precision": float(precision[present].mean()),
        "macro_recall": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "confusion_matrix": cm.tolist(),
        "num_samples": int(p.size),
        "num_present_classes": int(present.sum()),
    }
