"""Delegation value (docs/method.md §4): the targets, and how well a signal predicts them.

binary      v = 1[probe wrong ∧ expert right]            (decisions at the unsafe cuts; SafeRoute's router label)
continuous  v = (2y − 1)(b − p) ∈ [−1, 1]                 (> 0: escalation moves the score toward the truth)

Offline only: the DV head is fitted in ``probes.fitting.heads`` and applied by ``probes.heads.inference`` / ``probes.runtime.monitor``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from probes.calibration.cascade_rule import DEFAULT_CUTS, Cuts

Target = Literal["binary", "continuous"]
F64 = npt.NDArray[np.float64]


def dv_binary(y: npt.ArrayLike, p: npt.ArrayLike, b: npt.ArrayLike, cuts: Cuts = DEFAULT_CUTS) -> npt.NDArray[np.int64]:
    """1 where escalating fixes the decision: the probe is wrong at its cut and the expert right at its own (the
    decisions the cascade takes; a probe certified at 0.9996 is "wrong" on a harmful 0.99 it lets through)."""
    labels = np.asarray(y, dtype=np.int64)
    probe_right = (np.asarray(p) >= cuts.probe).astype(np.int64) == labels
    expert_right = (np.asarray(b) >= cuts.expert).astype(np.int64) == labels
    helps: npt.NDArray[np.int64] = (~probe_right & expert_right).astype(np.int64)
    return helps


def dv_continuous(y: npt.ArrayLike, p: npt.ArrayLike, b: npt.ArrayLike) -> F64:
    sign = 2.0 * np.asarray(y, dtype=np.float64) - 1.0
    return sign * (np.asarray(b, dtype=np.float64) - np.asarray(p, dtype=np.float64))


def signal_quality(signal: npt.ArrayLike, y: npt.ArrayLike, p: npt.ArrayLike, b: npt.ArrayLike,
                   cuts: Cuts = DEFAULT_CUTS) -> dict[str, float]:
    """Spearman(signal, true continuous v) and AUROC of the signal for "delegation helps" (binary v at ``cuts``)."""
    s = np.asarray(signal, dtype=np.float64)
    v = dv_continuous(y, p, b)
    helps = dv_binary(y, p, b, cuts)
    rho = spearmanr(s, v).statistic if np.std(s) > 0 and np.std(v) > 0 else float("nan")
    auroc = float(roc_auc_score(helps, s)) if 0 < helps.sum() < len(helps) else float("nan")
    return {"spearman_v": float(rho), "auroc_helps": auroc, "helps": int(helps.sum()), "n": len(s)}
