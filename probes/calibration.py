"""Learn-then-Test calibration of the delegation threshold (method.md §6).

Guarantee: with probability ≥ 1 − δ over the calibration draw, P_x(signal(x) > τ*) ≤ α for traffic
exchangeable with the calibration data. Thresholds are tested from the most conservative (highest τ) down
with exact binomial p-values and fixed-sequence testing: stop at the first p ≥ δ; no Bonferroni factor
is needed because the order was fixed on data independent of the test split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy.stats import binom

Variant = Literal["budget", "pareto"]
F64 = npt.NDArray[np.float64]


def budget_pvalue(delegated: int, n: int, alpha: float) -> float:
    """Exact p-value of H0 "delegation rate > α" given ``delegated`` of ``n``: P(Bin(n, α) ≤ k)."""
    return float(binom.cdf(delegated, n, alpha))


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
    v = np.sort(np.asarray(values, dtype=np.float64))
    above = v.size - np.searchsorted(v, grid, side="right")
    return above / max(1, v.size)


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


@dataclass
class Calibration:
    """The result, stored in the bundle manifest; ``threshold=None`` means no valid threshold."""

    signal: str
    variant: Variant
    alpha: float
    delta: float
    threshold: float | None
    n_cal: int
    n_opt: int
    n_ht: int
    seed: int
    certified: int
    tested: int
    ht_rate: float | None
    opt_error: float | None
    grid_size: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return self.threshold is not None

    def to_manifest(self) -> dict[str, Any]:
        out = asdict(self)
        out["valid"] = self.valid
        return out


def fixed_sequence_test(rates: F64, n: int, alpha: float, delta: float) -> int:
    """Number of leading hypotheses rejected: reject while p < δ (strict), stop at the first failure."""
    count = 0
    for rate in rates:
        k = int(np.rint(rate * n))  # an int under numpy 1.x too, where round() keeps float64
        if budget_pvalue(k, n, alpha) < delta:
            count += 1
        else:
            break
    return count


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
    signal_name: str = "dv",
    grid_size: int = 200,
    opt_fraction: float = 0.3,
) -> Calibration:
    """LTT on one calibration set: the opt part orders (and Pareto-filters) the grid, the HT part tests it.

    ``error_risk(τ_grid) → R_o`` is evaluated on the opt indices; it receives the grid and must close over
    the opt split's labels and scores (see ``cascade_error_risk``). Required for the Pareto variant.
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


def cascade_predictions(
    signal: F64, threshold: float | None, p: F64, b: F64
) -> tuple[F64, npt.NDArray[np.bool_]]:
    """s(x) = b(x) if delegated else p(x); delegated ⇔ signal > τ (never when τ is None)."""
    delegated = np.zeros(signal.shape, bool) if threshold is None else signal > threshold
    return np.where(delegated, b, p), delegated


def cascade_error_risk(signal: F64, p: F64, b: F64, y: npt.ArrayLike) -> Callable[[F64], F64]:
    """R_o(τ) = 1 − accuracy of the cascade at decision 0.5, for each τ of a grid."""
    labels = np.asarray(y, dtype=np.int64)
    probe_right = (p >= 0.5).astype(np.int64) == labels
    expert_right = (b >= 0.5).astype(np.int64) == labels

    def risk(grid: F64) -> F64:
        out = np.empty(grid.shape, dtype=np.float64)
        for i, tau in enumerate(grid):
            delegated = signal > tau
            out[i] = 1.0 - float(np.mean(np.where(delegated, expert_right, probe_right)))
        return out

    return risk
