"""Delegation value (method.md §4): targets, and the DV head on the same activations as the probe.

binary      v = 1[probe wrong ∧ expert right]            (decisions at 0.5; SafeRoute's router label)
continuous  v = (2y − 1)(b − p) ∈ [−1, 1]                 (> 0: escalation moves the score toward the truth)

The DV head also sees what uncertainty knows, the probe's logit and |p − 0.5|, next to the activations,
with its regularisation chosen by cross-validation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegressionCV, RidgeCV
from sklearn.metrics import roc_auc_score

from probes.heads import LinearHead, standardisation

Target = Literal["binary", "continuous"]
F64 = npt.NDArray[np.float64]
EXTRA_FEATURES = ("probe_logit", "abs_margin")


def dv_binary(y: npt.ArrayLike, p: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.int64]:
    labels = np.asarray(y, dtype=np.int64)
    probe_right = (np.asarray(p) >= 0.5).astype(np.int64) == labels
    expert_right = (np.asarray(b) >= 0.5).astype(np.int64) == labels
    helps: npt.NDArray[np.int64] = (~probe_right & expert_right).astype(np.int64)
    return helps


def dv_continuous(y: npt.ArrayLike, p: npt.ArrayLike, b: npt.ArrayLike) -> F64:
    sign = 2.0 * np.asarray(y, dtype=np.float64) - 1.0
    return sign * (np.asarray(b, dtype=np.float64) - np.asarray(p, dtype=np.float64))


def with_extra_features(features: npt.ArrayLike, p: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Activations + [probe logit, |p − 0.5|] (the same columns ``probes.monitor.dv_inputs`` builds)."""
    x = np.asarray(features, dtype=np.float32)
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    logit = np.log(q) - np.log(1 - q)
    return np.concatenate([x, np.stack([logit, np.abs(q - 0.5)], axis=1).astype(np.float32)], axis=1)


@dataclass
class DVFit:
    head: LinearHead
    target: Target
    regularization: float
    n_train: int
    positives: int


def fit_dv(
    features: npt.ArrayLike, y: npt.ArrayLike, p: npt.ArrayLike, b: npt.ArrayLike, *, target: Target = "binary",
    seed: int = 0,
) -> DVFit:
    """Fit the DV head (logistic for binary, ridge for continuous) on standardised [activations, extras]."""
    x = with_extra_features(features, p)
    mean, scale = standardisation(x)
    z = (x - mean) / scale
    if target == "binary":
        v = dv_binary(y, p, b)
        if v.sum() < 3 or v.sum() > len(v) - 3:
            raise ValueError(f"DV binary target has {int(v.sum())} positives of {len(v)}: too few to learn from")
        folds = int(min(5, v.sum(), len(v) - v.sum()))
        model = LogisticRegressionCV(Cs=np.logspace(-4, 1, 12), cv=folds, scoring="roc_auc", max_iter=3000,
                                     class_weight="balanced", random_state=seed)
        with warnings.catch_warnings():
            # sklearn 1.8 announces a change of LogisticRegressionCV's attribute layout; we read coef_ and C_ only.
            warnings.simplefilter("ignore", FutureWarning)
            model.fit(z, v)
        head = LinearHead(mean=mean, scale=scale, weight=model.coef_[0].astype(np.float32),
                          bias=float(model.intercept_[0]))
        return DVFit(head, target, float(model.C_[0]), len(v), int(v.sum()))
    cont = dv_continuous(y, p, b)
    ridge = RidgeCV(alphas=np.logspace(-1, 5, 13))
    ridge.fit(z, cont)
    head = LinearHead(mean=mean, scale=scale, weight=np.asarray(ridge.coef_, dtype=np.float32),
                      bias=float(ridge.intercept_))
    return DVFit(head, target, float(ridge.alpha_), len(cont), int((cont > 0).sum()))


def signal_quality(signal: npt.ArrayLike, y: npt.ArrayLike, p: npt.ArrayLike, b: npt.ArrayLike) -> dict[str, float]:
    """Spearman(signal, true continuous v) and AUROC of the signal for "delegation helps" (binary v)."""
    s = np.asarray(signal, dtype=np.float64)
    v = dv_continuous(y, p, b)
    helps = dv_binary(y, p, b)
    rho = spearmanr(s, v).statistic if np.std(s) > 0 and np.std(v) > 0 else float("nan")
    auroc = float(roc_auc_score(helps, s)) if 0 < helps.sum() < len(helps) else float("nan")
    return {"spearman_v": float(rho), "auroc_helps": auroc, "helps": int(helps.sum()), "n": int(len(s))}
