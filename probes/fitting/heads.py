"""Fitting the heads (training only; the runtime never imports this module): the safety probe, the DV head
(docs/method.md §4) and the SafeRoute-style router, each returned as an inference-only head of ``probes.heads.inference``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, RidgeCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neural_network import MLPClassifier

from probes.calibration.cascade_rule import DEFAULT_CUTS, Cuts
from probes.fitting.dv import Target, dv_binary, dv_continuous
from probes.heads.inference import EXTRA_FEATURES, FloatArray, LinearHead, MLPHead, with_extra_features

F64 = npt.NDArray[np.float64]


def standardisation(features: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0
    return mean.astype(np.float32), scale.astype(np.float32)


def fit_logistic(
    features: npt.ArrayLike, labels: npt.ArrayLike, *, c: float = 0.5, max_iter: int = 2000, seed: int = 0,
    sample_weight: npt.ArrayLike | None = None,
) -> LinearHead:
    """L2 logistic regression on standardised features (optionally weighted per item)."""
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    if len(np.unique(y)) < 2:
        raise ValueError("logistic probe needs both classes in its training data")
    mean, scale = standardisation(x)
    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    model.fit((x - mean) / scale, y, sample_weight=weights)
    return LinearHead(
        mean=mean, scale=scale, weight=model.coef_[0].astype(np.float32), bias=float(model.intercept_[0])
    )


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
    cuts: Cuts

    def inputs(self, features: npt.ArrayLike, p: npt.ArrayLike) -> FloatArray:
        """The head's inputs for new items: activations + the extras around the cut it was trained at."""
        return with_extra_features(features, p, self.cuts.probe)


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
    feature_sets: tuple[FeatureSet, ...] = FEATURE_SETS, seed: int = 0, folds: int = 5, cuts: Cuts = DEFAULT_CUTS,
) -> DVFit:
    """Fit the DV head (logistic for binary, ridge for continuous) on standardised [activations, extras].

    The feature set is chosen by outer cross-validation (AUROC for "delegation helps") on the training
    data alone: activations only enter when they predict where the expert helps better than the probe's
    own confidence does, so the head cannot be made worse than what its extras already know.
    ``cuts``: the probe's and the expert's unsafe cuts, at which "the expert fixes the probe's decision" is taken
    and from which the probe's margin is measured (the decisions the cascade will take, not 0.5).
    """
    x = with_extra_features(features, p, cuts.probe)
    dim = x.shape[1] - len(EXTRA_FEATURES)
    mean, scale = standardisation(x)
    z = (x - mean) / scale
    helps = dv_binary(y, p, b, cuts)
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
    return DVFit(head, target, chosen, reg, len(v), int(helps.sum()), cv_auroc, cuts)


def crossfit_probe(features: npt.ArrayLike, y: npt.ArrayLike, *, c: float, folds: int = 5, seed: int = 0) -> F64:
    """Out-of-fold probe scores: each item scored by a probe that never saw it (DV labels need honest p)."""
    x = np.asarray(features, dtype=np.float32)
    labels = np.asarray(y, dtype=np.int64)
    out = np.zeros(len(labels), dtype=np.float64)
    for train_idx, test_idx in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, labels):
        out[test_idx] = fit_logistic(x[train_idx], labels[train_idx], c=c, seed=seed).proba(x[test_idx])
    return out


def fit_router(features: npt.ArrayLike, target: npt.ArrayLike, *, hidden: tuple[int, ...] = (256, 64),
               seed: int = 0) -> MLPHead:
    """An MLP on the pooled features for the binary DV target (SafeRoute's router)."""
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(target, dtype=np.int64)
    if y.sum() < 2:
        raise ValueError("router target has fewer than 2 positives")
    mean, scale = standardisation(x)
    # Few positives: balance them by repetition (MLPClassifier has no class weights).
    pos = np.flatnonzero(y == 1)
    reps = max(1, int((len(y) - len(pos)) / max(1, len(pos))))
    idx = np.concatenate([np.arange(len(y)), np.repeat(pos, reps - 1)])
    model = MLPClassifier(hidden_layer_sizes=hidden, alpha=1e-2, max_iter=300, early_stopping=False,
                          random_state=seed)
    model.fit((x[idx] - mean) / scale, y[idx])
    return MLPHead(
        mean=mean, scale=scale,
        weights=tuple(w.astype(np.float32) for w in model.coefs_),
        biases=tuple(b.astype(np.float32) for b in model.intercepts_),
    )


def fit_mlp_probe(features: npt.ArrayLike, labels: npt.ArrayLike, *, hidden: tuple[int, ...] = (256,),
                  alpha: float = 1e-2, max_iter: int = 200, seed: int = 0,
                  sample_weight: npt.ArrayLike | None = None) -> MLPHead:
    """A ReLU MLP safety probe on standardised pooled features (optionally weighted per item): the head with
    more capacity than the logistic one, at a few hundred thousand FLOPs per record."""
    from sklearn.exceptions import ConvergenceWarning

    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    if len(np.unique(y)) < 2:
        raise ValueError("MLP probe needs both classes in its training data")
    mean, scale = standardisation(x)
    model = MLPClassifier(hidden_layer_sizes=hidden, alpha=alpha, max_iter=max_iter, random_state=seed)
    weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit((x - mean) / scale, y, sample_weight=weights)
    return MLPHead(
        mean=mean, scale=scale,
        weights=tuple(w.astype(np.float32) for w in model.coefs_),
        biases=tuple(b.astype(np.float32) for b in model.intercepts_),
    )
