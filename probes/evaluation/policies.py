"""Evaluation of delegation policies across budgets, guarantee validation, and the written report.

Thresholds are always calibrated on the bundle's calibration split and applied as is to the evaluation
records: nothing is refitted on the data being measured.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from probes.calibration.cascade_rule import Cuts, cascade_decisions, cascade_scores, per_1k
from probes.calibration.ltt import Variant, calibrate, cascade_predictions
from probes.evaluation.cascade import CascadeContext, Scored, calibrate_signal, random_signal
from probes.fitting.dv import dv_continuous
from probes.metrics import decision_metrics as all_metrics
from probes.runtime.manifest import SIGNAL_NAMES, Signal

F64 = npt.NDArray[np.float64]
POLICIES = ("ctd", "uncertainty", "router", "random", "oracle")
SIGNAL_OF: dict[str, Signal | None] = {"ctd": Signal.DV, "uncertainty": Signal.UNCERTAINTY, "router": Signal.ROUTER,
                                       "random": None}


def decision_metrics(y: npt.ArrayLike, scores: F64, flagged: npt.ArrayLike) -> dict[str, float]:
    """AUROC of the scores; accuracy, F1 and benign flag rate (fpr) of the flags: what every policy row carries."""
    m = all_metrics(y, scores, flagged)
    return {"auroc": m["auroc"], "accuracy": m["accuracy"], "f1": m["f1"], "fpr": m["fpr"]}


def oracle_delegation(ev: Scored, alpha: float) -> npt.NDArray[np.bool_]:
    """Delegate the items with the largest true v > 0, at most an α fraction (an upper bound)."""
    v = dv_continuous(ev.y, ev.p, ev.b)
    k = int(np.floor(alpha * len(v)))
    order = np.argsort(-v, kind="stable")[:k]
    chosen = np.zeros(len(v), dtype=bool)
    chosen[order[v[order] > 0]] = True
    return chosen


def evaluate_policies(
    ctx: CascadeContext, evaluation: Scored, budgets: list[float], *, delta: float = 0.1,
) -> dict[str, Any]:
    cal = ctx.split("calibration")
    cuts = ctx.cuts
    manifest = ctx.bundle.manifest
    expert_cut = manifest.expert_cut(ctx.expert.name)
    out: dict[str, Any] = {
        "n": len(evaluation.records), "positives": int(evaluation.y.sum()), "delta": delta,
        "cuts": {"probe": None if manifest.unsafe_cut is None else manifest.unsafe_cut.model_dump(mode="json"),
                 "expert": None if expert_cut is None else expert_cut.model_dump(mode="json"),
                 "applied": {"probe": cuts.probe, "expert": cuts.expert}},
        "probe_only": decision_metrics(evaluation.y, evaluation.p, evaluation.p >= cuts.probe),
        "expert_only": decision_metrics(evaluation.y, evaluation.b, evaluation.b >= cuts.expert),
        "policies": {name: [] for name in POLICIES},
        "groups": {},
    }
    group_keys = [f"{r.source}/{r.category}" if r.category else r.source for r in evaluation.records]
    # Each signal once per record set, not once per budget.
    cal_values = {p: random_signal(len(cal.records), 0) if s is None else ctx.signal(s, cal)
                  for p, s in SIGNAL_OF.items()}
    eval_values = {p: random_signal(len(evaluation.records), 1) if s is None else ctx.signal(s, evaluation)
                   for p, s in SIGNAL_OF.items()}
    for alpha in budgets:
        for policy in POLICIES:
            if policy == "oracle":
                threshold, valid, delegated = None, True, oracle_delegation(evaluation, alpha)
            else:
                threshold, valid, delegated = calibrated_delegation(
                    ctx, cal, evaluation, SIGNAL_OF[policy], alpha, delta=delta,
                    variant="budget" if policy == "random" else "pareto",
                    cal_values=cal_values[policy], eval_values=eval_values[policy])
            row, flagged = policy_row(evaluation, alpha, threshold, valid, delegated, cuts)
            out["policies"][policy].append(row)
            if policy in ("ctd", "uncertainty"):
                out["groups"].setdefault(policy, {})[str(alpha)] = group_analysis(
                    group_keys, delegated, evaluation.y, evaluation.p >= cuts.probe, flagged)
    out["faic"] = {name: faic(out, name) for name in ("ctd", "uncertainty", "router", "random")}
    return out


def calibrated_delegation(
    ctx: CascadeContext, cal: Scored, evaluation: Scored, signal: Signal | None, alpha: float, *, delta: float,
    variant: Variant, cal_values: F64, eval_values: F64,
) -> tuple[float | None, bool, npt.NDArray[np.bool_]]:
    """(τ, valid, delegated): the signal calibrated on the calibration records, applied as is to the evaluated ones."""
    result = calibrate_signal(ctx, cal, signal, alpha=alpha, delta=delta, variant=variant, values=cal_values)
    _, delegated = cascade_predictions(eval_values, result.threshold, evaluation.p, evaluation.b)
    return result.threshold, result.valid, delegated


def policy_row(evaluation: Scored, alpha: float, threshold: float | None, valid: bool,
               delegated: npt.NDArray[np.bool_], cuts: Cuts) -> tuple[dict[str, Any], npt.NDArray[np.bool_]]:
    """One metrics.json row for a delegation decision, and the cascade's "unsafe" flags at the bundle's cuts."""
    final = cascade_scores(delegated, evaluation.p, evaluation.b)
    flagged = cascade_decisions(delegated, evaluation.p, evaluation.b, cuts)
    row = {"alpha": alpha, "threshold": threshold, "valid": valid, "realized_rate": float(delegated.mean()),
           **decision_metrics(evaluation.y, final, flagged),
           "expert_calls_per_1k": per_1k(float(delegated.sum()), len(delegated))}
    return row, flagged


def group_analysis(keys: list[str], delegated: npt.NDArray[np.bool_], y: npt.ArrayLike,
                   probe_flags: npt.NDArray[np.bool_], cascade_flags: npt.NDArray[np.bool_]) -> dict[str, dict[str, float]]:
    """Where the budget goes: delegation rate and accuracy gain over probe-only, per source/category."""
    labels = np.asarray(y)
    idx: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        idx[key].append(i)
    table = {}
    for key, members in sorted(idx.items()):
        m = np.asarray(members)
        probe_acc = float(np.mean(probe_flags[m] == labels[m]))
        cascade_acc = float(np.mean(cascade_flags[m] == labels[m]))
        table[key] = {"n": len(m), "delegation_rate": float(delegated[m].mean()),
                      "accuracy_gain": cascade_acc - probe_acc}
    return table


def faic(report: dict[str, Any], policy: str, metric: str = "accuracy") -> float:
    """Area between the policy's curve and probe-only over the budget range, over the oracle's area."""
    base = report["probe_only"][metric]
    rows, oracle = report["policies"][policy], report["policies"]["oracle"]
    alphas = np.array([r["alpha"] for r in rows])
    if len(alphas) < 2:
        gain = rows[0][metric] - base if rows else 0.0
        top = oracle[0][metric] - base if oracle else 0.0
        return float(gain / top) if top > 0 else float("nan")
    area = np.trapezoid([r[metric] - base for r in rows], alphas)
    top = np.trapezoid([r[metric] - base for r in oracle], alphas)
    return float(area / top) if top > 0 else float("nan")


def validate_guarantee(values: F64, *, alpha: float, delta: float, splits: int, cal_fraction: float = 0.5,
                       seed: int = 0) -> dict[str, Any]:
    """Repeat budget calibration on random calibration/evaluation splits of one file.

    A violation is a realised evaluation rate above α. The evaluation half is finite, so its rate is
    itself noisy around the threshold's true rate; ``violation_rate_population`` measures instead the
    rate on the whole file (the empirical population the splits are drawn from), which has no
    evaluation noise. The LTT guarantee bounds the latter by δ.
    """
    rng = np.random.default_rng(seed)
    n = len(values)
    n_cal = round(cal_fraction * n)
    realized, population, violations, violations_pop, none = [], [], 0, 0, 0
    for i in range(splits):
        perm = rng.permutation(n)
        cal, ev = values[perm[:n_cal]], values[perm[n_cal:]]
        result = calibrate(cal, alpha=alpha, delta=delta, variant="budget", seed=i, grid_size=100)
        if result.threshold is None:
            none += 1
            rate = pop = 0.0
        else:
            rate = float(np.mean(ev > result.threshold))
            pop = float(np.mean(values > result.threshold))
        realized.append(rate)
        population.append(pop)
        violations += rate > alpha
        violations_pop += pop > alpha
    return {
        "violation_rate": violations / splits, "alpha": alpha, "delta": delta, "splits": splits,
        "mean_realized_rate": float(np.mean(realized)), "violation_rate_population": violations_pop / splits,
        "mean_population_rate": float(np.mean(population)), "no_valid_threshold": none, "n": n, "n_cal": n_cal,
        "noise_note": "violation_rate uses the held-out half (finite-sample noise included); "
                      "violation_rate_population uses the whole file as the population (no evaluation noise)",
    }


def _cut_lines(cuts: dict[str, Any] | None) -> list[str]:
    """How the unsafe cuts were set: certified (benign flag rate ≤ ε w.p. ≥ 1 − δ on calibration) or not."""
    if not cuts:
        return []
    lines = []
    for scorer in ("probe", "expert"):
        applied = cuts["applied"][scorer]
        cut = cuts.get(scorer)
        if cut is None:
            lines.append(f"- {scorer} unsafe cut {applied:g}: not calibrated (default)")
        elif cut["valid"]:
            lines.append(f"- {scorer} unsafe cut {applied:.4f}: certified benign flag rate ≤ ε = {cut['epsilon']} "
                         f"(δ = {cut['delta']}) on {cut['n']} benign calibration items (realised {cut['fpr']:.4f})")
        else:
            lines.append(f"- {scorer} unsafe cut {applied:g}: NOT certified at ε = {cut['epsilon']} (δ = "
                         f"{cut['delta']}, {cut['n']} benign calibration items); default kept")
    return [*lines, ""]


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """metrics.json is written by the caller; this draws the PNG plots and report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric in zip(axes, ("auroc", "accuracy", "f1"), strict=True):
        for policy, rows in report["policies"].items():
            ax.plot([r["alpha"] for r in rows], [r[metric] for r in rows], marker="o", label=policy)
        ax.axhline(report["probe_only"][metric], color="grey", ls="--", label="probe only")
        ax.axhline(report["expert_only"][metric], color="black", ls=":", label="expert only")
        ax.set_xlabel("delegation budget α")
        ax.set_title(metric.upper() if metric == "auroc" else metric)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "metrics_vs_budget.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for policy, rows in report["policies"].items():
        if policy != "oracle":
            ax.plot([r["alpha"] for r in rows], [r["realized_rate"] for r in rows], marker="o", label=policy)
    alphas = [r["alpha"] for r in report["policies"]["ctd"]]
    ax.plot(alphas, alphas, color="black", ls="--", label="α")
    ax.set_xlabel("target α")
    ax.set_ylabel("realised delegation rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "realized_vs_target.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    groups = report["groups"].get("ctd", {})
    if groups:
        alpha_key = sorted(groups, key=float)[len(groups) // 2]
        table = groups[alpha_key]
        keys = sorted(table, key=lambda k: -table[k]["delegation_rate"])[:25]
        fig, ax = plt.subplots(figsize=(8, max(3, 0.3 * len(keys))))
        ax.barh(keys, [table[k]["delegation_rate"] for k in keys])
        ax.invert_yaxis()
        ax.set_xlabel(f"CTD delegation rate at α={alpha_key}")
        fig.tight_layout()
        paths.append(out / "delegation_by_group.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    lines = [
        "# Evaluation report", "",
        (f"n = {report['n']} ({report['positives']} unsafe); thresholds calibrated on the bundle's calibration split "
         f"(LTT, δ = {report['delta']}), applied unchanged here."), "",
        *_cut_lines(report.get("cuts")),
        "| policy | α | threshold | realised rate | AUROC | accuracy | F1 | benign flag rate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("probe_only", "expert_only"):
        m = report[name]
        lines.append(f"| {name} | – | – | {'0' if name == 'probe_only' else '1'} | {m['auroc']:.4f} | "
                     f"{m['accuracy']:.4f} | {m['f1']:.4f} | {m['fpr']:.4f} |")
    for policy, rows in report["policies"].items():
        for r in rows:
            tau = "–" if r["threshold"] is None else f"{r['threshold']:.4f}"
            lines.append(f"| {policy} | {r['alpha']} | {tau} | {r['realized_rate']:.3f} | {r['auroc']:.4f} | "
                         f"{r['accuracy']:.4f} | {r['f1']:.4f} | {r['fpr']:.4f} |")
    lines += ["", "FAIC (accuracy): " + ", ".join(f"{k} {v:.3f}" for k, v in report["faic"].items()), ""]
    if "signal_quality" in report:
        lines += ["Signal quality on these records (Spearman with true v; AUROC for 'delegation helps'):", ""]
        for name, q in report["signal_quality"].items():
            lines.append(f"- {name}: Spearman {q['spearman_v']:.3f}, AUROC {q['auroc_helps']:.3f} "
                         f"({q['helps']} helpful of {q['n']})")
    if "per_file" in report:
        lines += ["", "Realised CTD delegation rate per file vs α:", ""]
        for name, rows in report["per_file"].items():
            lines.append(f"- {name}: " + ", ".join(f"α={r['alpha']}: {r['realized_rate']:.3f}" for r in rows))
    lines += ["", *[f"![{p.stem}]({p.name})" for p in paths], ""]
    (out / "report.md").write_text("\n".join(lines))
    return paths


def evaluation_report(ctx: CascadeContext, files: list[Path] | None, alphas: list[float], *,
                      delta: float) -> dict[str, Any]:
    """Every policy at every budget on ``files`` (default: the bundle's evaluation split), signal quality of
    each delegation signal, and per-file CTD rows when several files are given: the report ``evaluate`` writes."""
    from probes.data import read_file
    from probes.fitting.dv import signal_quality

    records = [r for path in files for r in read_file(path)] if files else list(ctx.prepared.splits.evaluation)
    scored = ctx.score(records)
    report = evaluate_policies(ctx, scored, alphas, delta=delta)
    report["signal_quality"] = {name: signal_quality(ctx.signal(name, scored), scored.y, scored.p, scored.b)
                                for name in SIGNAL_NAMES}
    if files and len(files) > 1:
        report["per_file"] = {
            path.name: evaluate_policies(ctx, ctx.score(read_file(path)), alphas, delta=delta)["policies"]["ctd"]
            for path in files
        }
    report["files"] = [str(p) for p in files] if files else ["<bundle evaluation split>"]
    return report
