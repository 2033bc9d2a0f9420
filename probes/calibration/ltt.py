"""Learn-then-Test calibration (docs/method.md §6): the delegation threshold and the unsafe cuts.

Delegation: with probability ≥ 1 − δ over the calibration draw, P_x(signal(x) > τ*) ≤ α for traffic
exchangeable with the calibration data. Thresholds are tested from the most conservative (highest τ) down
with exact binomial p-values and fixed-sequence testing: stop at the first p ≥ δ; no Bonferroni factor
is needed because the order was fixed on data independent of the test split.

Unsafe cut: the same test on the benign (label 0) calibration items, with "flagged" (score ≥ cut) in place of
"delegated": with probability ≥ 1 − δ the benign flag rate P(score ≥ cut | benign) ≤ ε. The family is nested
(a lower cut flags a superset), so testing every distinct benign score from the top down stays valid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import numpy.typing as npt

from probes.calibration.binomial import binom_cdf
from probes.calibration.cascade_rule import Cuts, cascade_scores
from probes.runtime.manifest import DEFAULT_UNSAFE_CUT, Calibration, Signal, UnsafeCut

__all__ = ["Calibration", "UnsafeCut", "budget_pvalue", "calibrate", "calibrate_unsafe_cut", "cascade_error_risk",
           "cascade_predictions", "delegation_rates", "fixed_sequence_test", "pareto_front", "split_opt_ht",
           "threshold_grid"]

Variant = Literal["budget", "pareto"]
F64 = npt.NDArray[np.float64]


def budget_pvalue(delegated: int, n: int, alpha: float) -> float:
    """Exact p-value of H0 "delegation rate > α" given ``delegated`` of ``n``: P(Bin(n, α) ≤ k)."""
    return float(binom_cdf(delegated, n, alpha))


def threshold_grid(values: npt.ArrayLike, size: int = 200) -> F64:
    """Candidate thresholds over the range of the signal, highest (delegate least) first.

    Quantile points of the observed values, plus one above the maximum (delegate nothing), so the
    grid adapts to the signal's scale (probabilities, ridge outputs, −|p − 0.5|).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("cannot build a threshold grid from no values")
    qs = np.quantile(v, np.linspace(0.0, 1.0, size))
    top = float(v.max()) + max(1e-9, 1e-6 * abs(float(v.max())))
    grid = np.unique(np.concatenate([qs, [top]]))
    return grid[::-1].copy()


def delegation_rates(values: npt.ArrayLike, grid: F64) -> F64:
    """Fraction of ``values`` strictly above each threshold (delegate ⇔ signal > τ)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    above = v.size - np.searchsorted(v, grid, side="right")
    return above / max(1, v.size)


def flag_rates(scores: npt.ArrayLike, cuts: F64) -> F64:
    """Fraction of ``scores`` at or above each cut (unsafe ⇔ score ≥ cut)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    at_or_above = s.size - np.searchsorted(s, cuts, side="left")
    return at_or_above / max(1, s.size)


def pareto_front(budget_risk: F64, error_risk: F64) -> npt.NDArray[np.bool_]:
    """Points not dominated in (budget risk, error risk), both minimised.

    Walking from the least delegation upward, a threshold is kept only if it strictly lowers the error
    below every cheaper one: delegating more without lowering error is harmful over-delegation.
    """
    order = np.lexsort((error_risk, budget_risk))
    keep = np.zeros(budget_risk.shape, dtype=bool)
    best = np.inf
    for i in order:
        if error_risk[i] < best - 1e-12:
            keep[i] = True
            best = error_risk[i]
    return keep


def fixed_sequence_test(rates: F64, n: int, alpha: float, delta: float) -> int:
    """Number of leading hypotheses rejected: reject while p < δ (strict), stop at the first failure.

    All p-values come from one vectorised binomial tail; the count is the length of the passing prefix.
    """
    r = np.asarray(rates, dtype=np.float64)
    if r.size == 0:
        return 0
    k = np.rint(r * n)  # counts: the rates are k/n
    failed = np.flatnonzero(binom_cdf(k, n, alpha) >= delta)
    return int(failed[0]) if failed.size else int(r.size)


def split_opt_ht(n: int, seed: int, opt_fraction: float = 0.3) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Disjoint opt / HT index sets (CTD: 30 % / 70 %)."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = round(opt_fraction * n)
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def calibrate(
    signal: npt.ArrayLike,
    *,
    alpha: float,
    delta: float,
    variant: Variant = "pareto",
    error_risk: Callable[[F64], F64] | None = None,
    seed: int = 0,
    signal_name: Signal | None = None,
    grid_size: int = 200,
    opt_fraction: float = 0.3,
) -> Calibration:
    """LTT on one calibration set: the opt part orders (and Pareto-filters) the grid, the HT part tests it.

    ``error_risk(τ_grid) → R_o`` is evaluated on the opt indices; it receives the grid and must close over
    the opt split's labels and scores (see ``cascade_error_risk``). Required for the Pareto variant.
    ``signal_name`` is None for a baseline the monitor cannot compute (evaluation's random policy).
    """
    if not 0 < alpha < 1 or not 0 < delta < 1:
        raise ValueError("alpha and delta must be in (0, 1)")
    values = np.asarray(signal, dtype=np.float64)
    opt_idx, ht_idx = split_opt_ht(values.size, seed, opt_fraction)
    opt, ht = values[opt_idx], values[ht_idx]
    grid = threshold_grid(opt if opt.size else values, grid_size)
    opt_errors: F64 | None = None
    if variant == "pareto":
        if error_risk is None:
            raise ValueError("the Pareto variant needs an error risk on the opt split")
        opt_errors = np.asarray(error_risk(grid), dtype=np.float64)
        keep = pareto_front(delegation_rates(opt, grid), opt_errors)
        candidates = grid[keep]
        cand_errors = opt_errors[keep]
    else:
        candidates = grid
        cand_errors = None
    order = np.argsort(-candidates, kind="stable")  # safest (highest τ) first
    candidates = candidates[order]
    ht_rates = delegation_rates(ht, candidates)
    certified = fixed_sequence_test(ht_rates, ht.size, alpha, delta)
    threshold: float | None = None
    opt_error: float | None = None
    ht_rate: float | None = None
    if certified:
        if cand_errors is None:
            chosen = certified - 1  # budget-only: the smallest certified threshold
        else:
            errs = cand_errors[order][:certified]
            chosen = int(np.flatnonzero(errs == errs.min())[-1])  # ties: the one that delegates more
            opt_error = float(errs[chosen])
        threshold = float(candidates[chosen])
        ht_rate = float(ht_rates[chosen])
    return Calibration(
        signal=signal_name, variant=variant, alpha=alpha, delta=delta, threshold=threshold, n_cal=int(values.size),
        n_opt=int(opt.size), n_ht=int(ht.size), seed=seed, certified=certified, tested=int(candidates.size),
        ht_rate=ht_rate, opt_error=opt_error, grid_size=grid_size,
    )


def calibrate_unsafe_cut(scores: npt.ArrayLike, labels: npt.ArrayLike, *, epsilon: float, delta: float,
                         scorer: str) -> UnsafeCut:
    """The lowest cut whose benign flag rate is certified ≤ ε at level δ (LTT on the label-0 items).

    Cuts are every distinct benign score plus one above them all (flag no benign item), tested from the highest
    down; the lowest certified one flags the most harmful items the guarantee allows. When none certifies (too
    few benign items for this ε and δ), the result says so (``valid=False``) and keeps the default cut.
    """
    if not 0 < epsilon < 1 or not 0 < delta < 1:
        raise ValueError("epsilon and delta must be in (0, 1)")
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    benign = s[(y == 0) & np.isfinite(s)]
    if benign.size == 0:
        return UnsafeCut(scorer=scorer, cut=DEFAULT_UNSAFE_CUT, valid=False, epsilon=epsilon, delta=delta, n=0,
                         fpr=None)
    top = float(benign.max()) + max(1e-9, 1e-6 * abs(float(benign.max())))
    grid = np.concatenate([[top], np.unique(benign)[::-1]])
    rates = flag_rates(benign, grid)
    certified = fixed_sequence_test(rates, benign.size, epsilon, delta)
    cut = float(grid[certified - 1]) if certified else DEFAULT_UNSAFE_CUT
    return UnsafeCut(scorer=scorer, cut=cut, valid=bool(certified), epsilon=epsilon, delta=delta, n=int(benign.size),
                     fpr=float(flag_rates(benign, np.asarray([cut]))[0]), certified=certified,
                     tested=int(grid.size))


def cascade_predictions(
    signal: F64, threshold: float | None, p: F64, b: F64
) -> tuple[F64, npt.NDArray[np.bool_]]:
    """s(x) = b(x) if delegated else p(x); delegated ⇔ signal > τ (never when τ is None)."""
    delegated = np.zeros(signal.shape, bool) if threshold is None else signal > threshold
    return cascade_scores(delegated, p, b), delegated


def cascade_error_risk(signal: F64, p: F64, b: F64, y: npt.ArrayLike, cuts: Cuts | None = None) -> Callable[[F64], F64]:
    """R_o(τ) = 1 − accuracy of the cascade at the unsafe cuts in force, for each τ of a grid."""
    labels = np.asarray(y, dtype=np.int64)
    c = cuts or Cuts()
    probe_right = (p >= c.probe).astype(np.int64) == labels
    expert_right = (b >= c.expert).astype(np.int64) == labels

    def risk(grid: F64) -> F64:
        out = np.empty(grid.shape, dtype=np.float64)
        for i, tau in enumerate(grid):
            # Correct where the source that decides is correct: the same selection as cascade_scores.
            out[i] = 1.0 - float(np.mean(np.where(signal > tau, expert_right, probe_right)))
        return out

    return risk
