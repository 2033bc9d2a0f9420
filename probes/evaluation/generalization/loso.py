"""The leave-source-out run: every recipe on every held-out group, the means, and the probe-feature sweep."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from probes.evaluation.generalization.folds import ExpertChoice, Fold, LosoConfig, Recipe, make_fold
from probes.evaluation.generalization.pool import (
    PoolRecord,
    Variant,
    build_pool,
    fill_expert_embeddings,
    fill_probe_features,
)
from probes.evaluation.generalization.scoring import (
    ADAPTED_ROWS,
    Guard,
    adapt_fold,
    cascade_rows,
    certified_cut,
    decision_figures,
    fit_head,
    recentre,
    score_fold,
)
from probes.logs import get_logger

log = get_logger(__name__)
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


Progress = Callable[[str, int], Callable[[int], None]]


def no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda _n: None


def stack_variants(features: dict[Variant, F32], variants: Sequence[Variant]) -> F32:
    return np.concatenate([features[v] for v in variants], axis=1) if len(variants) > 1 else features[variants[0]]


def finetuned_expert_scores(cache_dir: Path, pool: Sequence[PoolRecord], fold: Fold, choice: ExpertChoice,
                            progress: Progress) -> F64:
    """The encoder-head expert fine-tuned on the fold's fit rows, scoring every pool row (cached per record)."""
    from probes.activations.record_cache import RecordStore, namespace_key
    from probes.config import EncoderHeadConfig
    from probes.experts.encoder_head import EncoderHeadExpert, train_encoder_head

    cfg = EncoderHeadConfig(backbone=choice.spec, max_length=choice.max_tokens)
    fit_records = [pool[i].record for i in fold.fit]
    expert_dir = train_encoder_head(cfg, fit_records, cache_dir=cache_dir,
                                    progress=progress(f"fine-tune expert ({fold.group})", len(fit_records)))
    expert = EncoderHeadExpert(expert_dir, dtype=cfg.dtype)
    store = RecordStore(cache_dir, namespace_key("expert", expert.name), description={"expert": expert.name})
    advance = progress(f"expert scores ({fold.group})", store.missing([p.key for p in pool]))

    def compute(rows: list[int]) -> F64:
        out = expert.score([pool[i].record.messages for i in rows])
        advance(len(rows))
        return out

    values, _ = store.get_or_compute([p.key for p in pool], compute, dim=1)
    return values[:, 0].astype(np.float64)


def evaluate_recipe(pool: Sequence[PoolRecord], features: dict[Variant, F32], embeddings: F32 | None,
                    recipe: Recipe, config: LosoConfig, *, cache_dir: Path | None = None,
                    progress: Progress = no_progress, guard: Guard | None = None) -> dict[str, Any]:
    """Every held-out group under one recipe: per-group rows and their means."""
    y = np.asarray([p.record.label for p in pool], dtype=np.int64)
    x = stack_variants(features, recipe.variants)
    groups: dict[str, Any] = {}
    for group in config.pool.groups:
        fold = make_fold(pool, group.name, recipe, calibration_fraction=config.calibration_fraction,
                         seed=config.seed)
        train_info = {"n_fit": len(fold.fit), "n_calibration": len(fold.calibration),
                      "fit_positives": int(y[fold.fit].sum()),
                      "files": sorted({pool[i].record.file for i in fold.fit})}
        if len(np.unique(y[fold.fit])) < 2 or not len(fold.test):
            groups[group.name] = {"skipped": "the training side lacks a class or the group is empty", **train_info}
            continue
        ext = None
        if config.expert.kind == "finetune":
            if cache_dir is None:
                raise ValueError("the fine-tuned expert needs a cache directory")
            ext = finetuned_expert_scores(cache_dir, pool, fold, config.expert, progress)
        e = embeddings if embeddings is not None else np.zeros((len(pool), 1), dtype=np.float32)
        s = score_fold(fold, x, e, y, recipe, config.expert.c, delta=config.delta, seed=config.seed,
                       expert_scores=ext)
        test = fold.test
        groups[group.name] = {
            "train": {k: v for k, v in train_info.items() if k != "files"}, "train_files": train_info["files"],
            "cuts": s.cuts,
            "probe": decision_figures(y[test], s.p[test]), "expert": decision_figures(y[test], s.b[test]),
            **cascade_rows(fold, x, y, s, alphas=config.alphas, delta=config.delta,
                           dv_feature_sets=config.dv_feature_sets, seed=config.seed),
        }
        if config.adapt_audits:
            groups[group.name]["adapted"] = adapt_fold(pool, fold, x, y, s, recipe, config, guard)
        log.info("loso.fold", recipe=recipe.name, group=group.name, probe_auroc=groups[group.name]["probe"]["auroc"],
                 expert_auroc=groups[group.name]["expert"]["auroc"])
    return {"recipe": recipe.model_dump(mode="json"), "groups": groups, "mean": summarise(groups, config.alphas)}


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarise(groups: dict[str, Any], alphas: Sequence[float]) -> dict[str, Any]:
    """Means over held-out groups: both-class groups for AUROC/F1/accuracy, one-class groups for the rate
    that exists there (recall of an all-harmful group, benign flag rate of an all-benign one)."""
    done = {k: v for k, v in groups.items() if "probe" in v}
    both = [v for v in done.values() if 0 < v["probe"]["positives"] < v["probe"]["n"]]
    harmful_only = [v for v in done.values() if v["probe"]["positives"] == v["probe"]["n"]]
    benign_only = [v for v in done.values() if v["probe"]["positives"] == 0]
    out: dict[str, Any] = {"groups_both_classes": len(both), "groups_harmful_only": len(harmful_only),
                           "groups_benign_only": len(benign_only)}
    for who in ("probe", "expert"):
        out[who] = {m: _mean([v[who][m] for v in both]) for m in
                    ("auroc", "accuracy", "majority_rate", "precision", "recall", "f1", "fpr", "tpr_at_1pct_fpr")}
        out[who]["above_majority"] = sum(v[who]["accuracy"] > v[who]["majority_rate"] for v in both)
        out[who]["recall_harmful_only"] = _mean([v[who]["recall"] for v in harmful_only])
        out[who]["fpr_benign_only"] = _mean([v[who]["fpr"] for v in benign_only])
    out["cascade"] = {}
    policies = sorted({p for v in done.values() for p in v["policies"]})
    for policy in policies:
        rows = []
        for i, alpha in enumerate(alphas):
            picked = [v["policies"][policy][i] for v in both if policy in v["policies"]]
            row = {"alpha": alpha, **{m: _mean([r[m] for r in picked]) for m in
                                      ("auroc", "accuracy", "f1", "fpr", "recall", "delegated")}}
            row["above_majority"] = sum(r["accuracy"] > r["majority_rate"] for r in picked)
            row["recall_harmful_only"] = _mean([v["policies"][policy][i]["recall"] for v in harmful_only
                                                if policy in v["policies"]])
            row["fpr_benign_only"] = _mean([v["policies"][policy][i]["fpr"] for v in benign_only
                                            if policy in v["policies"]])
            rows.append(row)
        out["cascade"][policy] = rows
    adapted = [v["adapted"] for v in done.values() if "adapted" in v and "skipped" not in v["adapted"]]
    if adapted:
        out["adapted"] = summarise_adapted(adapted)
    return out



def summarise_adapted(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means of ``adapt_fold`` rows over the groups whose evaluation half holds both classes."""
    both = [r for r in rows if 0 < r["offline"]["positives"] < r["offline"]["n"]]
    out: dict[str, Any] = {"groups_both_classes": len(both)}
    for name in [n for n in ADAPTED_ROWS if any(n in r for r in both)]:
        picked = [r[name] for r in both if name in r]
        out[name] = {m: _mean([v[m] for v in picked]) for m in ("auroc", "accuracy", "majority_rate", "f1", "fpr")}
        out[name]["above_majority"] = sum(v["accuracy"] > v["majority_rate"] for v in picked)
        out[name]["fpr_within_epsilon"] = sum(v["fpr"] <= v["epsilon"] for v in picked if "epsilon" in v)
    return out


def sweep_variants(pool: Sequence[PoolRecord], features: dict[Variant, F32], combos: Sequence[tuple[Variant, ...]],
                   recipe: Recipe, config: LosoConfig) -> list[dict[str, Any]]:
    """Probe-only leave-source-out for each feature combination (the probe architecture is picked here,
    not on a random split): mean AUROC / F1 / accuracy over held-out groups with both classes."""
    y = np.asarray([p.record.label for p in pool], dtype=np.int64)
    folds = [make_fold(pool, g.name, recipe, calibration_fraction=config.calibration_fraction, seed=config.seed)
             for g in config.pool.groups]
    out = []
    for combo in combos:
        x = stack_variants(features, combo)
        per_group: dict[str, Any] = {}
        for fold in folds:
            if len(np.unique(y[fold.fit])) < 2:
                continue
            probe = fit_head(x[fold.fit], y[fold.fit], fold.weights, recipe.c, config.seed)
            p = probe.proba(x)
            if recipe.cut == "fpr":
                benign = fold.calibration[y[fold.calibration] == 0]
                cut = certified_cut(p[benign], epsilon=recipe.epsilon, delta=config.delta, seed=config.seed)
                p = recentre(p, cut or 0.5)
            per_group[fold.group] = decision_figures(y[fold.test], p[fold.test])
        both = [v for v in per_group.values() if 0 < v["positives"] < v["n"]]
        out.append({"variants": [list(v) for v in combo],
                    **{m: _mean([v[m] for v in both]) for m in ("auroc", "f1", "accuracy", "fpr", "tpr_at_1pct_fpr")},
                    "above_majority": sum(v["accuracy"] > v["majority_rate"] for v in both),
                    "per_group_auroc": {k: v["auroc"] for k, v in per_group.items()}})
    return out


def run_loso(config: LosoConfig, *, cache_dir: Path, datasets_dir: Path, progress: Progress = no_progress,
             sweep: Sequence[tuple[Variant, ...]] = (), guard: Guard | None = None,
             guard_name: str | None = None) -> dict[str, Any]:
    """The whole yardstick: pool, cached features and expert embeddings, every recipe on every group.

    ``guard``: a guard model that also labels the adaptation's audits (``adapt_fold``), named ``guard_name``."""
    pool = build_pool(datasets_dir, config.pool)
    variants = sorted({v for r in config.recipes for v in r.variants} | {v for c in sweep for v in c})
    keys = [p.key for p in pool]
    from probes.activations.record_cache import RecordStore  # noqa: F401  (the stores live under cache_dir/records)

    todo = len(set(keys))
    features, computed = fill_probe_features(cache_dir, pool, variants, spec=config.probe_spec,
                                             max_tokens=config.probe_max_tokens, dtype=config.dtype,
                                             progress=progress("probe features (cached per record)", todo))
    embeddings, expert_computed, expert_name = None, 0, f"encoder-head fine-tuned per fold ({config.expert.spec})"
    if config.expert.kind == "frozen":
        embeddings, expert_computed, backbone = fill_expert_embeddings(
            cache_dir, pool, spec=config.expert.spec, max_tokens=config.expert.max_tokens, dtype=config.dtype,
            progress=progress("expert embeddings (cached per record)", todo))
        expert_name = f"frozen {backbone} + logistic head per fold"
    report: dict[str, Any] = {
        "config": config.model_dump(mode="json"), "expert": expert_name, "adapt_guard": guard_name,
        "pool": {"n": len(pool), "positives": int(sum(p.record.label for p in pool)),
                 "groups": {g.name: {"n": sum(p.group == g.name for p in pool),
                                     "positives": sum(p.record.label for p in pool if p.group == g.name),
                                     "files": list(g.files)} for g in config.pool.groups}},
        "computed": {"probe_records": computed, "expert_records": expert_computed},
        "recipes": {},
    }
    for recipe in config.recipes:
        report["recipes"][recipe.name] = evaluate_recipe(pool, features, embeddings, recipe, config,
                                                         cache_dir=cache_dir, progress=progress, guard=guard)
    if sweep:
        base = config.recipes[-1]
        report["sweep"] = {"recipe": base.name, "rows": sweep_variants(pool, features, sweep, base, config)}
    return report
