"""Evaluation: cross-modal retrieval metrics and classification metrics."""
from mmpretrain.eval.metrics import classification_metrics
from mmpretrain.eval.retrieval import (
    chance_recall,
    gather_features,
    retrieval_metrics,
    retrieval_ranks,
    retrieval_report,
)

__all__ = [
    "chance_recall",
    "classification_metrics",
    "gather_features",
    "retrieval_metrics",
    "retrieval_ranks",
    "retrieval_report",
]
