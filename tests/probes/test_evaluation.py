from __future__ import annotations

import numpy as np

from probes.evaluation.policies import faic, validate_guarantee


def test_validate_guarantee_accounts_for_the_population() -> None:
    values = np.random.default_rng(0).normal(size=3000)
    result = validate_guarantee(values, alpha=0.1, delta=0.1, splits=200)
    assert result["splits"] == 200 and result["no_valid_threshold"] == 0
    assert result["violation_rate_population"] <= 0.1 + 3 * np.sqrt(0.09 / 200)
    assert 0.05 < result["mean_realized_rate"] <= 0.1


def test_faic_is_one_for_the_oracle_and_zero_for_probe_only() -> None:
    rows = lambda accs: [{"alpha": a, "accuracy": v} for a, v in zip((0.1, 0.2, 0.3), accs, strict=True)]
    report = {"probe_only": {"accuracy": 0.8},
              "policies": {"oracle": rows([0.85, 0.9, 0.92]), "ctd": rows([0.85, 0.9, 0.92]),
                           "random": rows([0.8, 0.8, 0.8])}}
    assert faic(report, "ctd") == 1.0 and faic(report, "random") == 0.0
