"""Classification metrics shared by training, evaluation, benchmarks and the demo."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score


def decision_metrics(labels: npt.ArrayLike, scores: npt.ArrayLike, flagged: npt.ArrayLike) -> dict[str, float]:
    """AUROC of the scores (NaN with a single class); accuracy / F1 / precision / recall of the "unsafe" flags,
    and ``fpr``, the benign flag rate (NaN without benign items)."""
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    predicted = np.asarray(flagged, dtype=bool).astype(np.int64)
    auroc = float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else float("nan")
    benign = y == 0
    return {
        "auroc": auroc,
        "accuracy": float(accuracy_score(y, predicted)),
        "f1": float(f1_score(y, predicted, zero_division=0)),
        "precision": float(precision_score(y, predicted, zero_division=0)),
        "recall": float(recall_score(y, predicted, zero_division=0)),
        "fpr": float(predicted[benign].mean()) if benign.any() else float("nan"),
        "n": len(y),
        "positives": int(y.sum()),
    }


def classification_metrics(
    labels: npt.ArrayLike, scores: npt.ArrayLike, *, threshold: float = 0.5
) -> dict[str, float]:
    """``decision_metrics`` with "unsafe" ⇔ score ≥ ``threshold`` (pass the scorer's unsafe cut)."""
    s = np.asarray(scores, dtype=np.float64)
    return decision_metrics(labels, s, s >= threshold)
