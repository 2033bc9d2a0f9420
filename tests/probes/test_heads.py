from __future__ import annotations

import numpy as np
import pytest

from probes.fitting.heads import fit_logistic
from probes.heads.inference import sigmoid
from probes.metrics import classification_metrics


def test_logistic_probe_learns_a_linear_rule() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)).astype(np.float32) * rng.uniform(0.1, 50, size=16).astype(np.float32)
    y = (x[:, 3] / x[:, 3].std() - x[:, 7] / x[:, 7].std() > 0).astype(int)
    head = fit_logistic(x[:300], y[:300], c=1.0)
    metrics = classification_metrics(y[300:], head.proba(x[300:]))
    assert metrics["auroc"] > 0.97 and metrics["accuracy"] > 0.9


def test_single_class_is_rejected() -> None:
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic(np.zeros((4, 2)), [1, 1, 1, 1])


def test_sigmoid_is_stable() -> None:
    out = sigmoid(np.array([-1000.0, 0.0, 1000.0]))
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0])


def test_metrics_single_class_auroc_nan() -> None:
    m = classification_metrics([1, 1], [0.9, 0.2])
    assert np.isnan(m["auroc"]) and m["accuracy"] == 0.5


def test_mlp_probe_learns_a_nonlinear_rule_and_honours_weights() -> None:
    from probes.fitting.heads import fit_mlp_probe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 4)).astype(np.float32)
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int64)  # XOR of signs: no linear rule separates it
    mlp = fit_mlp_probe(x, y, hidden=(32,), max_iter=500)
    linear = fit_logistic(x, y)
    assert np.mean((mlp.proba(x) >= 0.5) == y) > 0.9
    assert np.mean((linear.proba(x) >= 0.5) == y) < 0.7
    # rows of weight zero teach nothing: labels flipped on them leave the fit close to the clean one
    flipped = y.copy()
    flipped[:100] = 1 - flipped[:100]
    weights = np.ones(len(y))
    weights[:100] = 0.0
    weighted = fit_mlp_probe(x, flipped, hidden=(32,), max_iter=500, sample_weight=weights)
    assert np.mean((weighted.proba(x[100:]) >= 0.5) == y[100:]) > 0.85
    with pytest.raises(ValueError, match="both classes"):
        fit_mlp_probe(x, np.zeros(len(x), dtype=np.int64))
