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
