"""The numpy binomial tail against scipy's (the reference lives in the tests only)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from probes.calibration.binomial import binom_cdf, binom_logcdf

ALPHAS = (0.0, 1e-12, 1e-6, 1e-3, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 0.999, 1 - 1e-9, 1.0)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 40, 200, 1000, 5000])
@pytest.mark.parametrize("a", ALPHAS)
def test_cdf_matches_scipy_over_every_k(n: int, a: float) -> None:
    k = np.arange(-2, n + 3)
    ours, ref = binom_cdf(k, n, a), binom.cdf(k, n, a)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("n", [200, 5000])
@pytest.mark.parametrize("a", [0.01, 0.1, 0.5])
def test_log_tail_stays_exact_where_the_cdf_underflows(n: int, a: float) -> None:
    k = np.arange(0, n // 10)
    ref = binom.logcdf(k, n, a)
    finite = np.isfinite(ref)
    np.testing.assert_allclose(binom_logcdf(k, n, a)[finite], ref[finite], rtol=1e-9, atol=1e-10)
    assert np.all(np.isfinite(binom_logcdf(k, n, a)))  # never −inf for a k that has mass


def test_vectorised_over_unsorted_thresholds_and_float_counts() -> None:
    k = np.array([30.0, 5.0, 12.0, 30.0, -1.0, 1e9])
    np.testing.assert_allclose(binom_cdf(k, 300, 0.05), binom.cdf(k, 300, 0.05), rtol=1e-9)
    assert binom_cdf(k, 300, 0.05).shape == k.shape


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        binom_cdf(1, 10, 1.5)
    with pytest.raises(ValueError):
        binom_cdf(1, -1, 0.5)
