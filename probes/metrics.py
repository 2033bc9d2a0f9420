"""Classification metrics shared by training, evaluation, benchmarks and the demo."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score


def classification_metrics(
    labels: npt.ArrayLike, scores: npt.ArrayLike, *, threshold: float = 0.5
) -> dict[str, float]:
    """AUROC (NaN with a single class), and accuracy / F1 / precision / recall at ``threshold``."""
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    predicted = (s >= threshold).astype(np.int64)
    auroc = float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else float("nan")
    return {
        "auroc": auroc,
        "accuracy": float(accuracy_score(y, predicted)),
        "f1": float(f1_score(y, predicted, zero_division=0)),
        "precision": float(precision_score(y, predicted, zero_division=0)),
        "recall": float(recall_score(y, predicted, zero_division=0)),
        "n": len(y),
        "positives": int(y.sum()),
    }
