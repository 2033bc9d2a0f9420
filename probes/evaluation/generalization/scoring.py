"""One fold scored: probe and expert fitted and cut, the guard teaching the probe, the cascade's policies."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from probes.conversation import Conversation
from probes.evaluation.generalization.folds import Fold, LosoConfig, Recipe, audit_half
from probes.evaluation.generalization.pool import PoolRecord
from probes.heads.inference import LinearHead

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def tpr_at_fpr(y: npt.ArrayLike, scores: npt.ArrayLike, fpr: float = 0.01) -> float:
    """Recall at the threshold that flags at most ``fpr`` of this set's benign items (NaN with one class)."""
    labels = np.asarray(y, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    benign, harmful = s[labels == 0], s[labels == 1]
    if not len(benign) or not len(harmful):
        return float("nan")
    allowed = int(np.floor(fpr * len(benign)))
    ordered = np.sort(benign)[::-1]
    # flag strictly above the (allowed+1)-th highest benign score: at most `allowed` benign items flagged
    tau = ordered[allowed] if allowed < len(ordered) else -np.inf
    return float(np.mean(harmful > tau))


def decision_figures(y: npt.ArrayLike, scores: npt.ArrayLike) -> dict[str, float]:
    """Everything a held-out row reports about scores whose cut is 0.5."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(y, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    flagged = s >= 0.5
    tp = int(np.sum(flagged & (labels == 1)))
    fp = int(np.sum(flagged & (labels == 0)))
    positives, negatives = int(labels.sum()), int(len(labels) - labels.sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / positives if positives else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if positives and precision + recall > 0 else 0.0
    return {
        "n": len(labels), "positives": positives,
        "auroc": float(roc_auc_score(labels, s)) if positives and negatives else float("nan"),
        "accuracy": float(np.mean(flagged == (labels == 1))) if len(labels) else float("nan"),
        "majority_rate": max(positives, negatives) / len(labels) if len(labels) else float("nan"),
        "precision": precision, "recall": recall, "f1": f1 if positives else float("nan"),
        "fpr": fp / negatives if negatives else float("nan"),
        "tpr_at_1pct_fpr": tpr_at_fpr(labels, s, 0.01),
    }


def _logit(p: npt.ArrayLike) -> F64:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.asarray(np.log(q) - np.log1p(-q), dtype=np.float64)


def recentre(p: npt.ArrayLike, cut: float) -> F64:
    """Scores whose 0.5 is ``cut``: a monotone shift in logit space, so AUROC is unchanged and every
    downstream rule that decides at 0.5 (DV labels, cascade risk, metrics) decides at the cut."""
    from probes.heads.inference import sigmoid

    return sigmoid(_logit(p) - float(_logit([cut])[0]))


def certified_cut(benign_scores: F64, *, epsilon: float, delta: float, seed: int = 0) -> float | None:
    """The lowest cut whose benign flag rate is certified <= epsilon with probability >= 1 - delta.

    The bundle's own unsafe-cut calibration (``probes.calibration.ltt.calibrate_unsafe_cut``) on benign rows only;
    None when the calibration set cannot certify any. ``seed`` is unused: the test has no random split.
    """
    from probes.calibration.ltt import calibrate_unsafe_cut

    if len(benign_scores) < 10:
        return None
    result = calibrate_unsafe_cut(benign_scores, np.zeros(len(benign_scores), dtype=np.int64), epsilon=epsilon,
                                  delta=delta, scorer="loso")
    return result.cut if result.valid else None


@dataclass
class FoldScores:
    """Scores of one fold, already recentred at their cuts."""

    p: F64  # probe, every pool row
    b: F64  # expert, every pool row
    p_oof: F64  # out-of-fold probe on the fit rows
    b_oof: F64
    cuts: dict[str, float | None]
    probe_head: LinearHead  # the probe fitted on the fit rows (its raw scores are p before recentring)


#: lbfgs iterations per head fit. A fold fits ~12 heads on a starved shared CPU; past a few hundred
#: iterations the held-out AUROC no longer moves, so the yardstick stops there (convergence warnings muted).
HEAD_MAX_ITER = 200


def fit_head(x: F32, y: npt.NDArray[np.int64], w: F64, c: float, seed: int) -> Any:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from probes.fitting.heads import fit_logistic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fit_logistic(x, y, c=c, seed=seed, sample_weight=w, max_iter=HEAD_MAX_ITER)


def _oof(x: F32, y: npt.NDArray[np.int64], w: F64, c: float, seed: int, folds: int = 3) -> F64:
    from sklearn.model_selection import StratifiedKFold

    out = np.zeros(len(y), dtype=np.float64)
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        out[te] = fit_head(x[tr], y[tr], w[tr], c, seed).proba(x[te])
    return out


def score_fold(fold: Fold, x: F32, e: F32, y: npt.NDArray[np.int64], recipe: Recipe, expert_c: float, *,
               delta: float, seed: int = 0, expert_scores: F64 | None = None) -> FoldScores:
    """Probe and expert fitted on the fold's fit rows, cut on its calibration rows, scored everywhere.

    ``expert_scores`` (per pool row) replaces the frozen expert when an expert was trained elsewhere.
    """
    fit, cal = fold.fit, fold.calibration
    probe = fit_head(x[fit], y[fit], fold.weights, recipe.c, seed)
    p, p_oof = probe.proba(x), _oof(x[fit], y[fit], fold.weights, recipe.c, seed)
    if expert_scores is None:
        expert = fit_head(e[fit], y[fit], fold.weights, expert_c, seed)
        b, b_oof = expert.proba(e), _oof(e[fit], y[fit], fold.weights, expert_c, seed)
    else:
        b, b_oof = expert_scores, expert_scores[fit]  # a fine-tuned expert is in-sample on fit (as in train-dv)
    cuts: dict[str, float | None] = {"probe": 0.5, "expert": 0.5}
    if recipe.cut == "fpr":
        benign = cal[y[cal] == 0]
        cuts = {"probe": certified_cut(p[benign], epsilon=recipe.epsilon, delta=delta, seed=seed),
                "expert": certified_cut(b[benign], epsilon=recipe.epsilon, delta=delta, seed=seed)}
    pc, bc = cuts["probe"] or 0.5, cuts["expert"] or 0.5
    return FoldScores(recentre(p, pc), recentre(b, bc), recentre(p_oof, pc), recentre(b_oof, bc), cuts, probe)



#: What teaches the probe in ``adapt_fold``: the dataset label (a guard that is right on the new traffic), the
#: fold's own expert at its certified cut (the cascade's offline expert playing the guard) and, when one is given,
#: a real guard model (``Guard``: any expert backend's ``score``, e.g. Llama Guard through ``hf-guard``).
ADAPT_GUARDS = ("oracle", "expert", "model")

#: A guard model for ``adapt_fold``: P(unsafe) of each conversation, in order.
Guard = Callable[[Sequence[Conversation]], npt.ArrayLike]


def adapt_fold(pool: Sequence[PoolRecord], fold: Fold, x: F32, y: npt.NDArray[np.int64], s: FoldScores,
               recipe: Recipe, config: LosoConfig, guard: Guard | None = None) -> dict[str, Any]:
    """The guard teaches the probe on the held-out group: ``probes.calibration.recalibration`` as the worker runs it.

    The group's records are split by a hash of their content into an *audit* half and an *evaluation* half
    (an audited record never counts in the figures: a refit head could memorise it). ``adapt_audits`` records
    of the audit half, drawn at random, are the window of an ``OnlineRecalibrator`` (window = min_window = the
    number drawn), labelled by each guard of ``ADAPT_GUARDS`` (``model``: only when a guard model is given; it
    scores the audited records only, unsafe at P ≥ 0.5), refit once per mode (``platt``: map + cut;
    ``head``: head + cut, certified out-of-fold); the evaluation half is then decided by the state in force
    (the bundle's head and cut when the window certified nothing). Also reported on the evaluation half: the
    offline probe and the expert, for comparison.
    """
    from probes.calibration.recalibration import OnlineRecalibrator
    from probes.config import AuditConfig

    test = fold.test
    in_audit_half = audit_half(pool, test, config.seed)
    audit_rows, evaluate = test[in_audit_half], test[~in_audit_half]
    rng = np.random.default_rng(config.seed)
    audited = rng.permutation(audit_rows)[:config.adapt_audits]
    out: dict[str, Any] = {"audits": len(audited), "evaluated": len(evaluate),
                           "offline": decision_figures(y[evaluate], s.p[evaluate]),
                           "expert": decision_figures(y[evaluate], s.b[evaluate])}
    if len(audited) < 10 or not len(evaluate):
        out["skipped"] = "fewer than 10 audit records or nothing to evaluate"
        return out
    head = s.probe_head
    raw = head.proba(x)
    cut = s.cuts["probe"]
    epsilon = recipe.epsilon if config.adapt_epsilon is None else config.adapt_epsilon
    labels = {"oracle": y[audited].astype(bool), "expert": s.b[audited] >= 0.5}
    if guard is not None:
        verdicts = np.asarray(guard([pool[i].record.messages for i in audited]), dtype=np.float64)
        labels["model"] = verdicts >= 0.5
    for teacher, unsafe_labels in labels.items():
        for mode in ("platt", "head"):
            audit = AuditConfig(window=len(audited), min_window=len(audited), refit_every=len(audited),
                                epsilon=epsilon, delta=config.delta, refit=mode, head_l2=config.adapt_head_l2)
            recal = OnlineRecalibrator(audit, offline_cut=cut or 0.5, offline_valid=cut is not None, head=head)
            for i, unsafe in zip(audited, unsafe_labels, strict=True):
                recal.add(float(raw[i]), bool(unsafe), x[i])
            state = recal.refit()
            scores = recal.calibrated(raw[evaluate], x[evaluate])
            out[f"{mode}_{teacher}_guard"] = {
                **decision_figures(y[evaluate], recentre(scores, state.cut)), "source": state.source,
                "window_benign": state.n_benign, "epsilon": epsilon}
    return out


def cascade_rows(fold: Fold, x: F32, y: npt.NDArray[np.int64], s: FoldScores, *, alphas: Sequence[float],
                 delta: float, dv_feature_sets: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """CTD (DV head) and uncertainty delegation, calibrated on the fold's calibration rows at each α."""
    from probes.calibration.ltt import calibrate, cascade_error_risk, cascade_predictions, split_opt_ht
    from probes.fitting.heads import fit_dv
    from probes.heads.inference import uncertainty
    from probes.runtime.manifest import Signal

    fit, cal, test = fold.fit, fold.calibration, fold.test
    signals: dict[str, F64] = {"uncertainty": uncertainty(s.p)}
    dv_info: dict[str, Any] = {}
    try:
        dv = fit_dv(x[fit], y[fit], s.p_oof, s.b_oof, target="binary", seed=seed,
                    feature_sets=tuple(dv_feature_sets))  # type: ignore[arg-type]
        signals["ctd"] = dv.head.proba(dv.inputs(x, s.p))
        dv_info = {"feature_set": dv.feature_set, "cv_auroc": dv.cv_auroc, "helps": dv.positives, "n": dv.n_train}
    except ValueError as exc:  # too few "expert helps" rows to learn from: report, do not crash the fold
        dv_info = {"error": str(exc)}
    out: dict[str, Any] = {"dv": dv_info, "policies": {}}
    opt, _ = split_opt_ht(len(cal), seed)
    for policy, values in signals.items():
        rows = []
        risk = cascade_error_risk(values[cal][opt], s.p[cal][opt], s.b[cal][opt], y[cal][opt])
        for alpha in alphas:
            result = calibrate(values[cal], alpha=alpha, delta=delta, variant="pareto", error_risk=risk, seed=seed,
                               signal_name=Signal.DV if policy == "ctd" else Signal.UNCERTAINTY)
            final, delegated = cascade_predictions(values[test], result.threshold, s.p[test], s.b[test])
            rows.append({"alpha": alpha, "threshold": result.threshold, "valid": result.valid,
                         "delegated": float(delegated.mean()), **decision_figures(y[test], final)})
        out["policies"][policy] = rows
    return out



ADAPTED_ROWS = ("offline", "expert", *(f"{mode}_{teacher}_guard" for teacher in ADAPT_GUARDS
                                       for mode in ("platt", "head")))
