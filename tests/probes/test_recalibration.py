from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from probes.calibration.recalibration import (
    OnlineRecalibrator,
    PlattMap,
    _logit,
    audit_selected,
    fit_anchored_logistic,
    fit_platt,
)
from probes.config import AuditConfig, Settings, load_settings
from probes.heads.inference import LinearHead


def test_platt_fit_matches_sklearn_logistic_regression_on_logit_p() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 800)
    p = 1 / (1 + np.exp(-(0.6 * (rng.normal(size=800) + 1.4 * y) - 0.4)))
    ours = fit_platt(p, y, l2=1e-8)
    ref = LogisticRegression(C=1e8, max_iter=10_000, tol=1e-12).fit(_logit(p)[:, None], y)
    assert ours.a == pytest.approx(float(ref.coef_[0, 0]), rel=1e-4)
    assert ours.b == pytest.approx(float(ref.intercept_[0]), rel=1e-4, abs=1e-5)


def test_platt_fit_survives_one_class_and_separable_windows() -> None:
    p = np.linspace(0.01, 0.99, 50)
    one_class = fit_platt(p, np.zeros(50))
    assert math.isfinite(one_class.a) and math.isfinite(one_class.b) and one_class.a > 0
    assert one_class(np.asarray([0.5]))[0] < 0.5  # everything benign: the map moves scores down
    separable = fit_platt(p, (p > 0.5).astype(int), l2=1e-3)
    assert math.isfinite(separable.a) and separable.a > 1
    m = PlattMap(a=2.0, b=-1.0)
    assert m.inverse(float(m(np.asarray([0.3]))[0])) == pytest.approx(0.3)


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_certified_cut_holds_the_benign_flag_rate_on_a_shifted_stream() -> None:
    """Benign traffic drifts up (logit ~ N(1, 1)): the offline cut 0.5 flags 84 % of it; the window's cut
    must keep the true flag rate ≤ ε in all but about δ of the runs."""
    cfg = AuditConfig(window=400, min_window=400, refit_every=400, epsilon=0.1, delta=0.1)
    violations, runs, recalls = 0, 200, []
    for seed in range(runs):
        rng = np.random.default_rng(seed)
        recal = OnlineRecalibrator(cfg, offline_cut=0.5)
        assert recal.state.source == "offline" and recal.state.probe_cut == 0.5
        for _ in range(cfg.window):
            harmful = rng.random() < 0.3
            z = rng.normal(3.0 if harmful else 1.0, 1.0)
            recal.observe(float(1 / (1 + math.exp(-z))), harmful)
        state = recal.state
        assert state.source == "window" and state.valid and state.version == 1 and state.n == cfg.window
        assert state.probe_cut is not None
        z_cut = float(_logit([state.probe_cut])[0])
        fpr = 1 - _phi(z_cut - 1.0)
        violations += fpr > cfg.epsilon
        recalls.append(1 - _phi(z_cut - 3.0))
        assert state.cut == pytest.approx(float(recal.calibrated(np.asarray([state.probe_cut]))[0]))
    assert 1 - _phi(0.0 - 1.0) > 0.8  # what the offline cut would have flagged
    assert violations / runs <= cfg.delta + 0.05
    assert np.mean(recalls) > 0.5  # certified, not merely "flag nothing"


def test_refits_every_k_audits_and_falls_back_offline_without_a_certificate() -> None:
    cfg = AuditConfig(window=50, min_window=20, refit_every=5, epsilon=0.05, delta=0.1)
    recal = OnlineRecalibrator(cfg, offline_cut=0.7)
    states = [recal.observe(0.2 + 0.01 * i, i % 2 == 0) for i in range(40)]
    refits = [i for i, s in enumerate(states) if s is not None]
    assert refits == [19, 24, 29, 34, 39]
    # ~20 expert-benign items cannot certify 5 % at δ = 0.1 (needs ≥ 45): the bundle's cut stays in force
    assert recal.state.source == "offline" and recal.state.probe_cut == 0.7 and recal.state.version == 5
    assert list(recal.flags([0.69, 0.7])) == [False, True]


def test_audit_sampler_is_deterministic_and_hits_the_rate() -> None:
    ids = [f"evt-{i}" for i in range(50_000)]
    first = [audit_selected(i, 0.01) for i in ids]
    assert first == [audit_selected(i, 0.01) for i in ids]  # re-delivery audits the same events
    assert sum(first) / len(ids) == pytest.approx(0.01, abs=0.002)
    assert first != [audit_selected(i, 0.01, salt="other") for i in ids]
    # a lower rate audits a subset of a higher one (same hash)
    low = [audit_selected(i, 0.005) for i in ids]
    assert all(f for f, lo in zip(first, low, strict=True) if lo)
    assert not any(audit_selected(i, 0.0) for i in ids[:100]) and all(audit_selected(i, 1.0) for i in ids[:100])
    with pytest.raises(ValueError):
        audit_selected("x", 1.5)


def test_audit_config_section_loads_from_env_and_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTD_AUDIT__RATE", "0.02")
    s: Settings = load_settings()
    assert s.audit.rate == 0.02 and s.audit.window == AuditConfig().window
    with pytest.raises(ValidationError):
        AuditConfig(window=50, min_window=100)


def test_add_defers_the_refit_to_the_caller_and_the_window_reports_its_benign_flag_rate() -> None:
    cfg = AuditConfig(window=20, min_window=10, refit_every=1)
    recal = OnlineRecalibrator(cfg, offline_cut=0.5)
    assert recal.window_benign_flag_rate() is None  # nothing benign yet
    for p, unsafe in [(0.6, False), (0.4, False), (0.7, False), (0.2, False), (0.9, True)] * 3:
        recal.add(p, unsafe)
    assert recal.window_size == 15 and recal.state.version == 0, "add never refits"
    assert recal.window_benign_flag_rate() == pytest.approx(0.5)  # 0.6 and 0.7 of 0.6, 0.4, 0.7, 0.2 at 0.5
    state = recal.refit(version=1234)
    assert state.version == 1234 and recal.refit().version == 1235


def _shifted_traffic(rng: np.random.Generator, n: int, d: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Pooled activations whose harm direction on the new traffic (axis 1) is not the bundle head's (axis 0)."""
    y = (rng.random(n) < 0.4).astype(np.int64)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, 1] += 3.0 * y
    return x, y


def _bundle_head(d: int = 12) -> LinearHead:
    w = np.zeros(d, dtype=np.float32)
    w[0] = 2.0
    return LinearHead(mean=np.zeros(d, dtype=np.float32), scale=np.ones(d, dtype=np.float32), weight=w, bias=0.0)


def test_anchored_logistic_matches_sklearn_when_the_pull_is_tiny_and_stays_at_the_prior_when_it_is_huge() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(5)
    x, y = _shifted_traffic(rng, 600, d=5)
    design = np.hstack([x, np.ones((len(y), 1))])
    prior = np.asarray([1.0, 0.0, 0.0, 0.0, 0.0, 0.3])
    ours = fit_anchored_logistic(design, y, np.zeros(6), l2=1e-8)
    ref = LogisticRegression(C=1e8, max_iter=10_000, tol=1e-12).fit(x, y)
    assert ours[:-1] == pytest.approx(ref.coef_[0], rel=5e-3, abs=1e-3)
    assert ours[-1] == pytest.approx(float(ref.intercept_[0]), rel=5e-3, abs=1e-3)
    assert fit_anchored_logistic(design, y, prior, l2=1e8) == pytest.approx(prior, abs=1e-3)
    with pytest.raises(ValueError):
        fit_anchored_logistic(design, y[:-1], prior, l2=1.0)


def test_a_refit_head_learns_the_new_traffic_and_its_cut_holds_the_benign_flag_rate() -> None:
    """The bundle's head reads axis 0, the new traffic's harm is on axis 1: a Platt map cannot fix that ranking,
    a head refit on the audited window does, and its certified cut (out-of-fold) keeps the flag rate ≤ ε."""
    head = _bundle_head()
    cfg = AuditConfig(window=400, min_window=400, refit_every=400, epsilon=0.1, delta=0.1, refit="head")
    rng = np.random.default_rng(11)
    recal = OnlineRecalibrator(cfg, offline_cut=0.5, head=head)
    x, y = _shifted_traffic(rng, cfg.window)
    p = head.proba(x)
    for row, score, harmful in zip(x, p, y, strict=True):
        recal.observe(float(score), bool(harmful), row)
    state = recal.state
    assert state.source == "window" and state.refit == "head" and state.valid and state.probe_cut is None
    test_x, test_y = _shifted_traffic(rng, 4000)
    flags = recal.flags(head.proba(test_x), test_x)
    assert np.mean(flags[test_y == 0]) <= cfg.epsilon + 0.02  # the certificate, on fresh traffic
    assert np.mean(flags[test_y == 1]) > 0.6  # and it ranks: the bundle's head is at chance here
    assert np.mean(head.proba(test_x)[test_y == 1] >= 0.5) < 0.6
    assert recal.window_benign_flag_rate() is not None
    with pytest.raises(ValueError):
        recal.flags(head.proba(test_x))  # a refit head scores activations, not the bundle's score


def test_head_mode_needs_the_head_and_the_activations_and_falls_back_without_a_certificate() -> None:
    cfg = AuditConfig(window=40, min_window=20, refit_every=5, epsilon=0.05, delta=0.1, refit="head")
    with pytest.raises(ValueError):
        OnlineRecalibrator(cfg, offline_cut=0.5)
    head = _bundle_head()
    recal = OnlineRecalibrator(cfg, offline_cut=0.5, head=head)
    with pytest.raises(ValueError):
        recal.add(0.3, False)
    with pytest.raises(ValueError):
        recal.add(0.3, False, np.zeros(3))
    x, y = _shifted_traffic(np.random.default_rng(2), 30)
    for row, harmful in zip(x, y, strict=True):
        recal.observe(float(head.proba(row[None])[0]), bool(harmful), row)
    # ~18 benign items cannot certify 5 % at δ = 0.1: the bundle's head and cut stay in force
    assert recal.state.source == "offline" and recal.state.probe_cut == 0.5 and recal.head is head
    assert list(recal.flags([0.49, 0.5])) == [False, True]
