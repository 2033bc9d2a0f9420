from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from probes.calibration.ltt import (
    budget_pvalue,
    calibrate,
    cascade_error_risk,
    delegation_rates,
    fixed_sequence_test,
    pareto_front,
    threshold_grid,
)


def test_pvalue_monotone_in_delegated_count_and_alpha() -> None:
    n = 500
    ps = [budget_pvalue(k, n, 0.1) for k in range(120)]
    assert all(a <= b for a, b in pairwise(ps))
    assert budget_pvalue(30, n, 0.1) > budget_pvalue(30, n, 0.2)
    assert budget_pvalue(0, n, 0.1) < 1e-20


def test_fst_stops_at_first_failure() -> None:
    n, alpha, delta = 1000, 0.1, 0.1
    # rates: certified, certified, fails, then one that would pass alone: it must not count
    rates = np.array([0.02, 0.05, 0.2, 0.01])
    assert fixed_sequence_test(rates, n, alpha, delta) == 2
    assert fixed_sequence_test(np.array([0.5, 0.01]), n, alpha, delta) == 0


def test_strict_rejection_at_delta() -> None:
    n, alpha = 200, 0.1
    k = 12
    p = budget_pvalue(k, n, alpha)
    assert fixed_sequence_test(np.array([k / n]), n, alpha, delta=p) == 0  # p < δ is strict
    assert fixed_sequence_test(np.array([k / n]), n, alpha, delta=p + 1e-9) == 1


def test_grid_descends_and_starts_above_max() -> None:
    v = np.random.default_rng(0).normal(size=300)
    grid = threshold_grid(v, 50)
    assert np.all(np.diff(grid) < 0) and grid[0] > v.max()
    assert delegation_rates(v, grid)[0] == 0.0


def test_threshold_non_increasing_in_alpha() -> None:
    d = np.random.default_rng(1).beta(2, 5, size=2000)
    taus = [calibrate(d, alpha=a, delta=0.1, variant="budget").threshold for a in (0.05, 0.1, 0.2, 0.3, 0.5)]
    assert all(t is not None for t in taus)
    assert all(a >= b for a, b in pairwise(taus))  # type: ignore[operator]


def _cascade_data(n: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(y * 0.6 + rng.normal(0.2, 0.25, n), 0, 1)
    b = np.clip(y * 0.8 + rng.normal(0.1, 0.15, n), 0, 1)
    d = -np.abs(p - 0.5) + rng.normal(0, 0.05, n)
    return y, p, b, d


def test_pareto_is_at_least_as_conservative_as_budget_only() -> None:
    for seed in range(5):
        y, p, b, d = _cascade_data(1500, seed)
        risk = cascade_error_risk(d, p, b, y)
        from probes.calibration.ltt import split_opt_ht

        opt, _ = split_opt_ht(len(d), 0)
        opt_risk = cascade_error_risk(d[opt], p[opt], b[opt], y[opt])
        budget = calibrate(d, alpha=0.2, delta=0.1, variant="budget")
        pareto = calibrate(d, alpha=0.2, delta=0.1, variant="pareto", error_risk=opt_risk)
        assert budget.threshold is not None and pareto.threshold is not None
        assert pareto.threshold >= budget.threshold
        assert risk is not None


def test_pareto_front_drops_harmful_over_delegation() -> None:
    budget = np.array([0.0, 0.1, 0.2, 0.3])
    error = np.array([0.3, 0.2, 0.25, 0.1])
    assert pareto_front(budget, error).tolist() == [True, True, False, True]


def test_no_valid_threshold_is_explicit() -> None:
    d = np.random.default_rng(2).uniform(size=40)
    result = calibrate(d, alpha=0.01, delta=0.05, variant="budget")  # 28 HT items cannot certify 1 %
    assert result.threshold is None and not result.valid and result.certified == 0


def test_pareto_needs_error_risk() -> None:
    with pytest.raises(ValueError, match="error risk"):
        calibrate(np.arange(10.0), alpha=0.1, delta=0.1, variant="pareto")


def test_coverage_on_a_known_distribution() -> None:
    """d ~ U(0, 1): the true rate of τ is 1 − τ. Violations must stay within δ plus sampling slack."""
    alpha, delta, draws, n = 0.1, 0.1, 1000, 400
    rng = np.random.default_rng(123)
    violations = 0
    for i in range(draws):
        result = calibrate(rng.uniform(size=n), alpha=alpha, delta=delta, variant="budget", seed=i, grid_size=100)
        true_rate = 0.0 if result.threshold is None else 1.0 - min(1.0, result.threshold)
        violations += true_rate > alpha
    rate = violations / draws
    assert rate <= delta + 3 * np.sqrt(delta * (1 - delta) / draws)
    assert rate > 0  # not vacuous: the threshold is near the boundary, not needlessly conservative


def test_unsafe_cut_certifies_the_benign_flag_rate_over_many_draws() -> None:
    """Benign scores ~ Beta(2, 5): the true flag rate of a cut c is its survival function. Over many calibration
    draws the certified cut's true rate exceeds ε in at most a δ fraction (plus sampling slack)."""
    from scipy.stats import beta

    from probes.calibration.ltt import calibrate_unsafe_cut

    epsilon, delta, draws, n_benign = 0.05, 0.1, 1000, 300
    rng = np.random.default_rng(7)
    violations, true_rates = 0, []
    for _ in range(draws):
        benign = rng.beta(2, 5, size=n_benign)
        harmful = rng.beta(5, 2, size=100)  # the harmful items play no part in the cut
        scores = np.concatenate([benign, harmful])
        labels = np.concatenate([np.zeros(n_benign, int), np.ones(100, int)])
        cut = calibrate_unsafe_cut(scores, labels, epsilon=epsilon, delta=delta, scorer="probe")
        assert cut.valid and cut.n == n_benign
        true_rate = float(beta.sf(cut.cut, 2, 5))
        true_rates.append(true_rate)
        violations += true_rate > epsilon
    rate = violations / draws
    assert rate <= delta + 3 * np.sqrt(delta * (1 - delta) / draws)
    assert rate > 0  # not vacuous: the cut sits near the boundary ...
    assert np.mean(true_rates) > 0.5 * epsilon  # ... and uses a good part of the flag rate allowed


def test_unsafe_cut_is_the_lowest_certified_and_reports_its_realised_rate() -> None:
    from probes.calibration.ltt import calibrate_unsafe_cut, flag_rates

    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.uniform(0, 1, 2000), rng.uniform(0.5, 1, 500)])
    labels = np.concatenate([np.zeros(2000, int), np.ones(500, int)])
    loose = calibrate_unsafe_cut(scores, labels, epsilon=0.2, delta=0.1, scorer="probe")
    tight = calibrate_unsafe_cut(scores, labels, epsilon=0.05, delta=0.1, scorer="probe")
    assert loose.valid and tight.valid and loose.cut < tight.cut
    benign = scores[:2000]
    assert tight.fpr == pytest.approx(float(np.mean(benign >= tight.cut)))
    # The next benign score below the cut would not pass the test any more (lowest certified cut).
    below = np.max(benign[benign < tight.cut])
    k = round(float(flag_rates(benign, np.array([below]))[0]) * benign.size)
    assert budget_pvalue(k, benign.size, 0.05) >= 0.1


def test_no_certifiable_unsafe_cut_keeps_the_default_and_says_so() -> None:
    from probes.calibration.ltt import calibrate_unsafe_cut
    from probes.runtime.manifest import DEFAULT_UNSAFE_CUT

    rng = np.random.default_rng(4)
    # 20 benign items cannot certify a 1 % flag rate at δ = 0.1: even flagging none has p = 0.99^20 ≈ 0.82.
    cut = calibrate_unsafe_cut(rng.uniform(size=30), [0] * 20 + [1] * 10, epsilon=0.01, delta=0.1, scorer="probe")
    assert not cut.valid and cut.cut == DEFAULT_UNSAFE_CUT and cut.certified == 0 and cut.n == 20
    none = calibrate_unsafe_cut([0.9, 0.8], [1, 1], epsilon=0.05, delta=0.1, scorer="expert")
    assert not none.valid and none.n == 0 and none.fpr is None


def test_vectorised_fst_matches_the_sequential_definition() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        n = int(rng.integers(1, 400))
        rates = np.sort(rng.uniform(0, 0.3, size=int(rng.integers(0, 30))))
        alpha, delta = float(rng.uniform(0.02, 0.3)), float(rng.uniform(0.01, 0.3))
        sequential = 0
        for r in rates:
            if budget_pvalue(int(np.rint(r * n)), n, alpha) < delta:
                sequential += 1
            else:
                break
        assert fixed_sequence_test(rates, n, alpha, delta) == sequential
