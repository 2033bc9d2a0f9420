"""Delegation value (method.md §4): targets, and the DV head on the same activations as the probe.

binary      v = 1[probe wrong ∧ expert right]            (decisions at 0.5; SafeRoute's router label)
continuous  v = (2y − 1)(b − p) ∈ [−1, 1]                 (> 0: escalation moves the score toward the truth)

The DV head also sees what uncertainty knows, the probe's logit and |p − 0.5|, next to the activations,
with its regularisation chosen by cross-validation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegressionCV, RidgeCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from probes.heads import LinearHead, fit_logistic, standardisation

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


FeatureSet = Literal["margin", "extras", "full"]
FEATURE_SETS: tuple[FeatureSet, ...] = ("margin", "extras", "full")


@dataclass
class DVFit:
    head: LinearHead
    target: Target
    feature_set: FeatureSet
    regularization: float
    n_train: int
    positives: int
    cv_auroc: dict[str, float]


def _mask(dim: int, feature_set: FeatureSet) -> npt.NDArray[np.bool_]:
    """Columns of [activations, probe logit, |p − 0.5|] a feature set may use; the others get weight 0."""
    used = np.zeros(dim + len(EXTRA_FEATURES), dtype=bool)
    used[-1] = True
    if feature_set in ("extras", "full"):
        used[-2] = True
    if feature_set == "full":
        used[:dim] = True
    return used


def _fit_linear(z: npt.NDArray[np.float32], v: npt.NDArray[Any], target: Target, seed: int) -> tuple[F64, float, float]:
    """(weights, bias, regularisation) with the strength chosen by inner cross-validation."""
    with warnings.catch_warnings():
        # sklearn 1.8 announces a change of LogisticRegressionCV's attribute layout; we read coef_ and C_ only.
        warnings.simplefilter("ignore", FutureWarning)
        if target == "binary":
            folds = int(min(5, v.sum(), len(v) - v.sum()))
            model = LogisticRegressionCV(Cs=np.logspace(-4, 1, 12), cv=folds, scoring="roc_auc", max_iter=3000,
                                         class_weight="balanced", random_state=seed)
            model.fit(z, v)
            return model.coef_[0].astype(np.float64), float(model.intercept_[0]), float(model.C_[0])
        ridge = RidgeCV(alphas=np.logspace(-1, 5, 13))
        ridge.fit(z, v)
        return np.asarray(ridge.coef_, dtype=np.float64), float(ridge.intercept_), float(ridge.alpha_)


def fit_dv(
    features: npt.ArrayLike, y: npt.ArrayLike, p: npt.ArrayLike, b: npt.ArrayLike, *, target: Target = "binary",
    feature_sets: tuple[FeatureSet, ...] = FEATURE_SETS, seed: int = 0, folds: int = 5,
) -> DVFit:
    """Fit the DV head (logistic for binary, ridge for continuous) on standardised [activations, extras].

    The feature set is chosen by outer cross-validation (AUROC for "delegation helps") on the training
    data alone: activations only enter when they predict where the expert helps better than the probe's
    own confidence does, so the head cannot be made worse than what its extras already know.
    """
    x = with_extra_features(features, p)
    dim = x.shape[1] - len(EXTRA_FEATURES)
    mean, scale = standardisation(x)
    z = (x - mean) / scale
    helps = dv_binary(y, p, b)
    if helps.sum() < max(3, folds) or helps.sum() > len(helps) - 3:
        raise ValueError(f"DV binary target has {int(helps.sum())} positives of {len(helps)}: too few to learn from")
    v: npt.NDArray[Any] = helps if target == "binary" else dv_continuous(y, p, b)
    cv_auroc: dict[str, float] = {}
    if len(feature_sets) > 1:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
        for fs in feature_sets:
            cols = _mask(dim, fs)
            pred = np.zeros(len(v))
            for train_idx, test_idx in splitter.split(z, helps):
                w, c, _ = _fit_linear(z[train_idx][:, cols], v[train_idx], target, seed)
                pred[test_idx] = z[test_idx][:, cols] @ w + c
            cv_auroc[fs] = float(roc_auc_score(helps, pred))
        chosen: FeatureSet = max(feature_sets, key=lambda fs: (cv_auroc[fs], -feature_sets.index(fs)))
    else:
        chosen = feature_sets[0]
    cols = _mask(dim, chosen)
    w_used, bias, reg = _fit_linear(z[:, cols], v, target, seed)
    weight = np.zeros(x.shape[1], dtype=np.float32)
    weight[cols] = w_used
    head = LinearHead(mean=mean, scale=scale, weight=weight, bias=bias)
    return DVFit(head, target, chosen, reg, len(v), int(helps.sum()), cv_auroc)


def crossfit_probe(features: npt.ArrayLike, y: npt.ArrayLike, *, c: float, folds: int = 5, seed: int = 0) -> F64:
    """Out-of-fold probe scores: each item scored by a probe that never saw it (DV labels need honest p)."""
    x = np.asarray(features, dtype=np.float32)
    labels = np.asarray(y, dtype=np.int64)
    out = np.zeros(len(labels), dtype=np.float64)
    for train_idx, test_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, labels):
        out[test_idx] = fit_logistic(x[train_idx], labels[train_idx], c=c, seed=seed).proba(x[test_idx])
    return out


def signal_quality(signal: npt.ArrayLike, y: npt.ArrayLike, p: npt.ArrayLike, b: npt.ArrayLike) -> dict[str, float]:
    """Spearman(signal, true continuous v) and AUROC of the signal for "delegation helps" (binary v)."""
    s = np.asarray(signal, dtype=np.float64)
    v = dv_continuous(y, p, b)
    helps = dv_binary(y, p, b)
    rho = spearmanr(s, v).statistic if np.std(s) > 0 and np.std(v) > 0 else float("nan")
    auroc = float(roc_auc_score(helps, s)) if 0 < helps.sum() < len(helps) else float("nan")
    return {"spearman_v": float(rho), "auroc_helps": auroc, "helps": int(helps.sum()), "n": len(s)}
