"""Exact binomial lower tail P(Bin(n, a) ≤ k) in numpy: the p-value of every Learn-then-Test hypothesis.

The runtime needs it (the budget controller re-certifies its window on live traffic), so it must not pull in
scipy. The pmf is built in log space, log C(n, j) as a cumulative sum of log((n − j + 1) / j), and the lower tail
as a running log-sum-exp, so tails far below the smallest double (1e-300 and less) stay exact to rounding
instead of underflowing to a wrong 0 that would certify anything.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


def binom_logcdf(k: npt.ArrayLike, n: int, a: float) -> F64:
    """log P(Bin(n, a) ≤ k) for each k (vectorised; k need not be sorted; k < 0 → −inf, k ≥ n → 0)."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"a must be in [0, 1], got {a}")
    ks = np.floor(np.asarray(k, dtype=np.float64))
    out = np.full(ks.shape, -np.inf)
    out[ks >= n] = 0.0
    inside = (ks >= 0) & (ks < n)
    if not inside.any():
        return out
    top = int(ks[inside].max())
    j = np.arange(top + 1, dtype=np.float64)
    if a == 0.0:
        logpmf = np.where(j == 0, 0.0, -np.inf)
    elif a == 1.0:
        logpmf = np.full(j.shape, -np.inf)  # all mass at j = n, which is above every k here
    else:
        log_choose = np.concatenate([[0.0], np.cumsum(np.log(n - j[1:] + 1.0) - np.log(j[1:]))])
        logpmf = log_choose + j * np.log(a) + (n - j) * np.log1p(-a)
    logcdf = np.minimum(np.logaddexp.accumulate(logpmf), 0.0)
    out[inside] = logcdf[ks[inside].astype(np.int64)]
    return out


def binom_cdf(k: npt.ArrayLike, n: int, a: float) -> F64:
    """P(Bin(n, a) ≤ k), exact up to rounding; see ``binom_logcdf``."""
    return np.exp(binom_logcdf(k, n, a))
