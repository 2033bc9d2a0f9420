from __future__ import annotations

import numpy as np
import pytest

from probes.calibration.cascade_rule import Cuts, cascade_decisions, cascade_scores, per_1k


def test_final_score_is_the_expert_where_delegated() -> None:
    p, b = np.array([0.1, 0.9, 0.4]), np.array([0.8, 0.2, 0.6])
    assert cascade_scores([True, False, True], p, b).tolist() == [0.8, 0.9, 0.6]


def test_decisions_use_each_scorers_own_cut() -> None:
    p, b = np.array([0.3, 0.3, 0.7, 0.7]), np.array([0.6, 0.6, 0.2, 0.2])
    delegated = np.array([True, False, True, False])
    cuts = Cuts(probe=0.25, expert=0.65)
    assert cascade_decisions(delegated, p, b, cuts).tolist() == [False, True, False, True]
    assert cascade_decisions(delegated, p, b, Cuts()).tolist() == [True, False, False, True]  # both at 0.5


def test_cost_per_1k_events() -> None:
    assert per_1k(3.0, 600) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        per_1k(1.0, 0)
