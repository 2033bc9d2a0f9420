"""The token-level conversation scorer under leave-source-out (issue 21 point 2), beside the mean-pooled probe."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from probes.activations.token_states import F16, record_token_states, template_prefix
from probes.evaluation.generalization.folds import Fold, LosoConfig, Recipe, make_fold
from probes.evaluation.generalization.loso import Progress, _mean, no_progress
from probes.evaluation.generalization.pool import PoolRecord, build_pool, fill_probe_features
from probes.evaluation.generalization.scoring import certified_cut, decision_figures, fit_head, recentre
from probes.evaluation.generalization.token_padding import PaddedFit, TokenPadding, fit_padded
from probes.fitting.token_scorer import OBJECTIVES, Objective, TokenScorerFit, fit_token_scorer
from probes.logs import get_logger

log = get_logger(__name__)
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclasses.dataclass(frozen=True)
class PoolStates:
    states: list[F16]  # per pool record, [tokens, dim]
    computed: int  # records the model ran on
    prefix: int  # the chat template's shared leading tokens (``template_prefix``)


def fill_token_states(cache_dir: Path, pool: Sequence[PoolRecord], *, layer: int = 15,
                      spec: str = "smollm2-135m-instruct", max_tokens: int = 256, dtype: str = "auto",
                      progress: Callable[[int], None] | None = None) -> PoolStates:
    """Per-token states of block ``layer`` for every pool record, cached per record; the model runs on missing
    records only."""
    from probes.activations.features import FeatureExtractor
    from probes.activations.models import load_model

    loaded = load_model(spec, cache_dir=cache_dir, dtype=dtype, max_layer=layer)
    extractor = FeatureExtractor(loaded, layer=layer, max_tokens=max_tokens, batch_tokens=8192, max_items=64)
    states, computed = record_token_states(cache_dir, extractor, [p.record.messages for p in pool],
                                           [p.key for p in pool], progress)
    return PoolStates(states, computed, template_prefix(extractor))


#: The token scorer's variants compared under leave-source-out: (objective, rolling window in tokens).
DEFAULT_VARIANTS: tuple[tuple[Objective, int], ...] = (("maxmean", 16), ("broadcast", 16), ("maxmean", 4),
                                                       ("maxmean", 64))


def parse_token_fits(text: str) -> tuple[TokenScorerFit, ...]:
    """'maxmean:16,broadcast:16' -> one fit per item (ValueError on anything else)."""
    fits = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        objective, _, window = item.partition(":")
        if objective not in OBJECTIVES or not window.isdigit() or int(window) < 1:
            raise ValueError(f"token scorer {item!r}: need OBJECTIVE:WINDOW, OBJECTIVE one of {OBJECTIVES}")
        fits.append(TokenScorerFit(objective=objective, window=int(window)))
    return tuple(fits)


#: Suffix of a token scorer fitted with padded rows (``token_padding``).
PADDED = " padded"


def variant_name(objective: str, window: int) -> str:
    return f"token {objective} w{window}"


def _decide(p: F64, fold: Fold, y: npt.NDArray[np.int64], recipe: Recipe, delta: float, seed: int) -> tuple[
        dict[str, float], float | None]:
    """Held-out figures of scores ``p`` (every pool row) at the recipe's cut, certified on the fold's calibration
    rows as ``score_fold`` does for the probe."""
    cut: float | None = 0.5
    if recipe.cut == "fpr":
        benign = fold.calibration[y[fold.calibration] == 0]
        cut = certified_cut(p[benign], epsilon=recipe.epsilon, delta=delta, seed=seed)
    return decision_figures(y[fold.test], recentre(p, cut or 0.5)[fold.test]), cut


#: Fits the padded token scorer of one fold (``token_padding.fit_padded`` with everything else bound).
PaddedFitter = Callable[[Fold, TokenScorerFit], PaddedFit]


def compare_fold(pool: Sequence[PoolRecord], fold: Fold, features: F32, states: Sequence[F16],
                 y: npt.NDArray[np.int64], recipe: Recipe, fits: Sequence[TokenScorerFit], *, delta: float,
                 seed: int = 0, skip: int = 0, padded: PaddedFitter | None = None) -> dict[str, Any]:
    """One held-out group: the mean-pooled logistic probe and each token-scorer fit on the same fit rows and
    weights, each cut on the same calibration rows; with ``padded``, each fit also with the fold's padded rows
    (cut on the calibration rows plus long benign ones)."""
    fit_rows = fold.fit
    out: dict[str, Any] = {}
    probe = fit_head(features[fit_rows], y[fit_rows], fold.weights, recipe.c, seed)
    figures, cut = _decide(probe.proba(features), fold, y, recipe, delta, seed)
    out["mean-pooled probe"] = {**figures, "cut": cut}
    for fit in fits:
        _, scorer = fit_token_scorer([states[i] for i in fit_rows], y[fit_rows], fold.weights, fit, skip=skip)
        figures, cut = _decide(scorer.proba(states), fold, y, recipe, delta, seed)
        out[variant_name(fit.objective, fit.window)] = {**figures, "cut": cut}
        log.info("token_scorer.fold", group=fold.group, variant=variant_name(fit.objective, fit.window),
                 auroc=figures["auroc"], probe_auroc=out["mean-pooled probe"]["auroc"])
        if padded is not None:
            got = padded(fold, fit)
            figures = decision_figures(y[fold.test], recentre(got.scorer.proba(states), got.cut or 0.5)[fold.test])
            out[variant_name(fit.objective, fit.window) + PADDED] = {**figures, "cut": got.cut,
                                                                     "filler_file": got.summary["filler_file"]}
    return out


def summarise_scorers(groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per scorer: means over two-class held-out groups, accuracy above the majority rate, recall of the
    all-harmful groups and the benign flag rate of the all-benign ones."""
    names = list(next(iter(groups.values()))) if groups else []
    out: dict[str, Any] = {}
    for name in names:
        rows = [g[name] for g in groups.values()]
        both = [r for r in rows if 0 < r["positives"] < r["n"]]
        out[name] = {m: _mean([r[m] for r in both]) for m in
                     ("auroc", "accuracy", "majority_rate", "f1", "fpr", "recall", "tpr_at_1pct_fpr")}
        out[name].update({
            "groups_both_classes": len(both), "above_majority": sum(r["accuracy"] > r["majority_rate"] for r in both),
            "recall_harmful_only": _mean([r["recall"] for r in rows if r["positives"] == r["n"]]),
            "fpr_benign_only": _mean([r["fpr"] for r in rows if r["positives"] == 0])})
    return out


def run_token_comparison(config: LosoConfig, recipe: Recipe, *, cache_dir: Path, datasets_dir: Path,
                         fits: Sequence[TokenScorerFit], layer: int = 15, max_tokens: int | None = None,
                         padding: TokenPadding | None = None, read_tokens: int = 4096,
                         progress: Progress = no_progress) -> dict[str, Any]:
    """Leave-source-out, token scorer vs the mean-pooled probe, on one recipe's folds (the pool's groups); with
    ``padding``, each token scorer also fitted with padded rows read at ``read_tokens``."""
    pool = build_pool(datasets_dir, config.pool)
    bound = max_tokens or config.probe_max_tokens
    todo = len({p.key for p in pool})
    read = fill_token_states(cache_dir, pool, layer=layer, spec=config.probe_spec, max_tokens=bound,
                             dtype=config.dtype, progress=progress("token states (cached per record)", todo))
    states = read.states
    # The baseline reads the same tokens: mean-pooled layer features at the same bound, from their own cache.
    features, _ = fill_probe_features(cache_dir, pool, [(layer, "mean")], spec=config.probe_spec,
                                      max_tokens=bound, dtype=config.dtype,
                                      progress=progress("probe features (cached per record)", todo))
    y = np.asarray([p.record.label for p in pool], dtype=np.int64)
    padded: PaddedFitter | None = None
    if padding is not None:
        from probes.activations.features import FeatureExtractor
        from probes.activations.models import load_model

        loaded = load_model(config.probe_spec, cache_dir=cache_dir, dtype=config.dtype, max_layer=layer)
        long_reader = FeatureExtractor(loaded, layer=layer, max_tokens=read_tokens, batch_tokens=read_tokens,
                                       max_items=8)
        chosen = padding

        def padded(fold: Fold, fit: TokenScorerFit) -> PaddedFit:
            return fit_padded(pool, fold, states, y, fit, chosen, long_reader, recipe=recipe, config=config,
                              cache_dir=cache_dir, datasets_dir=datasets_dir, skip=read.prefix)
    groups: dict[str, Any] = {}
    for group in config.pool.groups:
        fold = make_fold(pool, group.name, recipe, calibration_fraction=config.calibration_fraction,
                         seed=config.seed)
        if len(np.unique(y[fold.fit])) < 2 or not len(fold.test):
            continue
        groups[group.name] = compare_fold(pool, fold, features[(layer, "mean")], states, y, recipe, fits,
                                          delta=config.delta, seed=config.seed, skip=read.prefix, padded=padded)
    return {"recipe": recipe.model_dump(mode="json"), "layer": layer, "max_tokens": bound,
            "pool": {"n": len(pool), "positives": int(y.sum()),
                     "tokens": int(sum(s.shape[0] for s in states)), "states_computed": read.computed},
            "template_prefix_tokens": read.prefix,
            "fits": [dataclasses.asdict(f) for f in fits], "groups": groups, "mean": summarise_scorers(groups),
            **({} if padding is None else {"padding": padding.model_dump(mode="json"), "read_tokens": read_tokens})}


def _f(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def report_lines(result: dict[str, Any]) -> list[str]:
    """The comparison as markdown: per group AUROC, then the means at the certified cut."""
    names = list(result["mean"])
    lines = [(f"## Token-level scorer vs mean-pooled probe (recipe `{result['recipe']['name']}`, layer "
             f"{result['layer']}, ≤ {result['max_tokens']} tokens)"), "",
             "Held-out AUROC (accuracy / majority rate at the cut certified on the calibration rows):", "",
             "| held-out group | n | unsafe | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for group, row in result["groups"].items():
        first = row[names[0]]
        cells = [f"{_f(row[n]['auroc'])} ({_f(row[n]['accuracy'])} / {_f(row[n]['majority_rate'])})" for n in names]
        lines.append(f"| {group} | {first['n']} | {first['positives']} | " + " | ".join(cells) + " |")
    lines += ["", ("| scorer | AUROC | accuracy | majority | F1 | FPR | TPR@1%FPR | acc > majority | "
              "recall (harmful-only) | FPR (benign-only) |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in result["mean"].items():
        lines.append(f"| {name} | {_f(m['auroc'])} | {_f(m['accuracy'])} | {_f(m['majority_rate'])} | "
                     f"{_f(m['f1'])} | {_f(m['fpr'])} | {_f(m['tpr_at_1pct_fpr'])} | "
                     f"{m['above_majority']}/{m['groups_both_classes']} | {_f(m['recall_harmful_only'])} | "
                     f"{_f(m['fpr_benign_only'])} |")
    return lines + [""]
