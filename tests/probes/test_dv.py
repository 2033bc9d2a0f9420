from __future__ import annotations

import numpy as np
import pytest

from probes.fitting.dv import dv_binary, dv_continuous, signal_quality
from probes.fitting.heads import fit_dv, fit_router
from probes.heads.inference import MLPHead


@pytest.mark.parametrize(
    "y, p, b, binary, sign",
    [
        (1, 0.9, 0.8, 0, 0),    # both right
        (1, 0.2, 0.3, 0, 0),    # both wrong (continuous: expert slightly closer, still wrong)
        (0, 0.1, 0.7, 0, -1),   # only probe right: escalation hurts
        (1, 0.3, 0.9, 1, 1),    # only expert right: escalation helps
        (0, 0.8, 0.1, 1, 1),
    ],
)
def test_golden_cases(y: int, p: float, b: float, binary: int, sign: int) -> None:
    assert dv_binary([y], [p], [b]).tolist() == [binary]
    cont = dv_continuous([y], [p], [b])[0]
    if sign:
        assert np.sign(cont) == sign
    assert -1 <= cont <= 1


def test_both_wrong_continuous_tracks_distance() -> None:
    assert dv_continuous([1], [0.2], [0.3])[0] == pytest.approx(0.1)


def _synthetic(n: int = 1200, seed: int = 0) -> tuple[np.ndarray, ...]:
    """A feature direction marks inputs where the probe errs and the expert does not."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype(np.float32)
    y = rng.integers(0, 2, n)
    hard = x[:, 0] > 1.0
    p = np.where(hard, np.where(y == 1, 0.3, 0.7), np.where(y == 1, 0.8, 0.2)) + rng.normal(0, 0.05, n)
    b = np.where(y == 1, 0.9, 0.1)
    return x, y, np.clip(p, 0, 1), b


@pytest.mark.parametrize("target", ["binary", "continuous"])
def test_dv_head_learns_where_the_expert_helps(target: str) -> None:
    x, y, p, b = _synthetic()
    fit = fit_dv(x[:800], y[:800], p[:800], b[:800], target=target)  # type: ignore[arg-type]
    d = fit.head.logit(fit.inputs(x[800:], p[800:]))
    q = signal_quality(d, y[800:], p[800:], b[800:])
    assert q["auroc_helps"] > 0.9 and q["spearman_v"] > 0.5


def test_dv_refuses_too_few_positives() -> None:
    x, y, _, _ = _synthetic(100)
    with pytest.raises(ValueError, match="too few"):
        fit_dv(x, y, y.astype(float), y.astype(float))


def test_router_roundtrip_and_learns() -> None:
    x, y, p, b = _synthetic()
    target = dv_binary(y, p, b)
    head = fit_router(x[:800], target[:800])
    again = MLPHead.from_tensors(head.to_tensors("router"), "router")
    np.testing.assert_allclose(again.proba(x[800:]), head.proba(x[800:]))
    assert signal_quality(head.proba(x[800:]), y[800:], p[800:], b[800:])["auroc_helps"] > 0.85


def test_feature_selection_keeps_activations_out_when_they_are_noise() -> None:
    rng = np.random.default_rng(3)
    n = 1500
    x = rng.normal(size=(n, 64)).astype(np.float32)
    y = rng.integers(0, 2, n)
    p = np.clip(np.where(y == 1, 0.7, 0.3) + rng.normal(0, 0.2, n), 0.01, 0.99)  # errors near 0.5 only
    b = np.where(y == 1, 0.95, 0.05)
    fit = fit_dv(x, y, p, b)
    assert fit.feature_set in ("margin", "extras") and set(fit.cv_auroc) == {"margin", "extras", "full"}
    assert np.all(fit.head.weight[:64] == 0)


def test_crossfit_probe_scores_are_out_of_fold() -> None:
    from probes.fitting.heads import crossfit_probe

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 200)).astype(np.float32)
    y = rng.integers(0, 2, 300)  # pure noise: in-sample a 200-d probe memorises, out-of-fold it cannot
    oof = crossfit_probe(x, y, c=10.0)
    assert abs(float(np.mean((oof >= 0.5) == y)) - 0.5) < 0.12
