"""Probe heads compared on the same leave-source-out folds: the logistic head, an MLP head, and single-layer
retraining (the probe layer's own block fine-tuned with the logistic head, probes/fitting/block_head.py).

Every head reads the same states: the ones entering block ``block`` (cached per record as the token states of
layer ``block`` − 1, probes/activations/token_states.py), run through the pretrained block (linear, MLP) or a
retrained copy of it (block), mean-pooled. Per held-out group: AUROC, accuracy vs the majority rate and the benign flag rate at the cut
certified on the fold's calibration rows (as ``score_fold`` certifies the probe's), and what each head costs.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field

from probes.config import Frozen
from probes.evaluation.generalization.folds import LosoConfig, Recipe, make_fold
from probes.evaluation.generalization.pool import PoolRecord, build_pool
from probes.evaluation.generalization.scoring import certified_cut, decision_figures, fit_head, recentre
from probes.fitting.block_head import BlockRunner, BlockTraining, block_flops_per_token
from probes.logs import get_logger

log = get_logger(__name__)
F64 = npt.NDArray[np.float64]
F16 = npt.NDArray[np.float16]

HeadType = Literal["linear", "mlp", "block"]
HEAD_TYPES: tuple[HeadType, ...] = ("linear", "mlp", "block")
Progress = Callable[[str, int], Callable[[int], None]]


class HeadsConfig(Frozen):
    heads: tuple[HeadType, ...] = HEAD_TYPES
    block: int = Field(15, ge=2, description="the retrained block (1-based): the probe layer's own block reads "
                       "the states leaving block - 1 and yields the probe layer's states")
    mlp_hidden: tuple[int, ...] = (256,)
    training: BlockTraining = BlockTraining()


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda _n: None


def head_flops(config: Any, *, block: int, mean_tokens: float, mlp_hidden: Sequence[int]) -> dict[str, Any]:
    """FLOPs of each head per token (per-record head costs spread over the mean record length), beside the
    monitored model's own pass up to the probe layer."""
    hidden = int(config.hidden_size)
    context = (mean_tokens + 1.0) / 2.0  # a causal record of n tokens attends (n + 1) / 2 tokens on average
    per_block = block_flops_per_token(config, context=context)
    widths = [hidden, *mlp_hidden, 1]
    per_record = {"linear": 4.0 * hidden,  # standardise (2) and dot product (2) per feature
                  "mlp": 2.0 * hidden + sum(2.0 * a * b for a, b in itertools.pairwise(widths))}
    pooling = float(hidden)  # one add per feature per token
    out: dict[str, Any] = {"mean_tokens": mean_tokens, "context": context,
                           "monitored_pass_per_token": block * per_block, "block_per_token": per_block}
    out["linear"] = pooling + per_record["linear"] / mean_tokens
    out["mlp"] = pooling + per_record["mlp"] / mean_tokens
    # The retrained block stands in for the pretrained one: beside the monitored pass it adds nothing when it is
    # the probe layer's own block; run as a separate head on the states entering it, it costs one block.
    out["block"] = per_block + out["linear"]
    out["block_replacing_probe_layer"] = out["linear"]
    return out


def compare_heads(pool: Sequence[PoolRecord], states: Sequence[F16], runner: BlockRunner, recipe: Recipe,
                  config: LosoConfig, heads_config: HeadsConfig, *, progress: Progress = _no_progress,
                  on_fold: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every head on every held-out group of ``config.pool.groups``, on the folds ``make_fold`` builds.

    ``on_fold`` sees the groups done so far after each fold (a long CPU run leaves its figures if cut short)."""
    from probes.fitting.block_head import fit_block_head, pooled_states
    from probes.fitting.heads import fit_mlp_probe

    y = np.asarray([p.record.label for p in pool], dtype=np.int64)
    frozen = pooled_states(runner, states, progress=progress("frozen block (pooled states)", len(states)))
    training = heads_config.training.model_copy(update={"c": recipe.c, "seed": config.seed})
    groups: dict[str, Any] = {}
    for group in config.pool.groups:
        fold = make_fold(pool, group.name, recipe, calibration_fraction=config.calibration_fraction,
                         seed=config.seed)
        fit, cal, test = fold.fit, fold.calibration, fold.test
        row: dict[str, Any] = {"train": {"n_fit": len(fit), "n_calibration": len(cal),
                                         "fit_positives": int(y[fit].sum())}}
        if len(np.unique(y[fit])) < 2 or not len(test):
            groups[group.name] = {"skipped": "the training side lacks a class or the group is empty", **row}
            continue
        for head in heads_config.heads:
            started = time.perf_counter()
            p = np.full(len(pool), np.nan, dtype=np.float64)
            extra: dict[str, Any] = {}
            if head == "linear":
                p = fit_head(frozen[fit], y[fit], fold.weights, recipe.c, config.seed).proba(frozen)
            elif head == "mlp":
                p = fit_mlp_probe(frozen[fit], y[fit], hidden=heads_config.mlp_hidden, seed=config.seed,
                                  sample_weight=fold.weights).proba(frozen)
            else:
                fitted = fit_block_head(runner, [states[i] for i in fit], y[fit], fold.weights,
                                        block=heads_config.block, training=training, frozen_pooled=frozen[fit])
                # the cut reads only the benign calibration rows
                scored = np.concatenate([cal[y[cal] == 0], test])
                p[scored] = fitted.proba([states[i] for i in scored])
                extra["epoch_losses"] = fitted.losses
            cut: float | None = 0.5
            if recipe.cut == "fpr":
                benign = cal[y[cal] == 0]
                cut = certified_cut(p[benign], epsilon=recipe.epsilon, delta=config.delta, seed=config.seed)
            scores = recentre(p, cut or 0.5)
            row[head] = {**decision_figures(y[test], scores[test]), "cut": cut,
                         "seconds": round(time.perf_counter() - started, 1), **extra}
        groups[group.name] = row
        if on_fold is not None:
            on_fold(groups)
        log.info("heads.fold", group=group.name, **{h: round(row[h]["auroc"], 3) for h in heads_config.heads
                                                     if not np.isnan(row[h]["auroc"])})
    mean_tokens = float(np.mean([len(s) for s in states])) if len(states) else 0.0
    return {"recipe": recipe.name, "heads": list(heads_config.heads), "training": training.model_dump(mode="json"),
            "block": heads_config.block, "groups": groups,
            "mean": summarise_heads(groups, heads_config.heads, recipe.epsilon),
            "flops": head_flops(runner.config, block=heads_config.block, mean_tokens=mean_tokens,
                                mlp_hidden=heads_config.mlp_hidden)}


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarise_heads(groups: dict[str, Any], heads: Sequence[str], epsilon: float) -> dict[str, Any]:
    """Per head: means over the held-out groups holding both classes, and the one-class groups' rates."""
    done = [v for v in groups.values() if "skipped" not in v]
    out: dict[str, Any] = {}
    for head in heads:
        rows = [v[head] for v in done]
        both = [r for r in rows if 0 < r["positives"] < r["n"]]
        out[head] = {m: _mean([r[m] for r in both]) for m in
                     ("auroc", "accuracy", "majority_rate", "fpr", "recall", "f1", "tpr_at_1pct_fpr")}
        out[head].update({
            "groups_both_classes": len(both),
            "above_majority": sum(r["accuracy"] > r["majority_rate"] for r in both),
            "fpr_within_2eps": sum(r["fpr"] <= 2 * epsilon for r in both),
            "recall_harmful_only": _mean([r["recall"] for r in rows if r["positives"] == r["n"]]),
            "fpr_benign_only": _mean([r["fpr"] for r in rows if r["positives"] == 0]),
            "seconds_per_fold": _mean([r["seconds"] for r in rows]),
        })
    return out


def run_heads(config: LosoConfig, heads_config: HeadsConfig, *, cache_dir: Path, datasets_dir: Path,
              progress: Progress = _no_progress,
              on_fold: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The pool, its cached block inputs, and every recipe of ``config`` under ``compare_heads``.

    ``on_fold(recipe, groups done)`` after each fold."""
    from probes.activations.features import FeatureExtractor
    from probes.activations.models import load_model
    from probes.activations.token_states import record_token_states
    from probes.fitting.block_head import block_runner

    pool = build_pool(datasets_dir, config.pool)
    block = heads_config.block
    # Blocks 1..block-1 feed the cache; the retrained block is loaded beside them from the same weights.
    upstream = load_model(config.probe_spec, cache_dir=cache_dir, dtype=config.dtype, max_layer=block - 1)
    # The states entering the block are those leaving the one below it: the token-state store at layer block-1.
    extractor = FeatureExtractor(upstream, layer=block - 1, max_tokens=config.probe_max_tokens, batch_tokens=8192,
                                 max_items=64)
    states, computed = record_token_states(
        cache_dir, extractor, [p.record.messages for p in pool], [p.key for p in pool],
        progress=progress("block inputs (cached per record)", len(pool)))
    runner = block_runner(load_model(config.probe_spec, cache_dir=cache_dir, dtype="fp32", max_layer=block), block)
    report: dict[str, Any] = {
        "config": config.model_dump(mode="json"), "heads_config": heads_config.model_dump(mode="json"),
        "states": {"model": upstream.model_id, "dtype": str(upstream.dtype).removeprefix("torch."),
                   "stored": "float16", "block": block, "max_tokens": config.probe_max_tokens},
        "pool": {"n": len(pool), "positives": int(sum(p.record.label for p in pool))},
        "computed": {"block_input_records": computed}, "recipes": {},
    }
    for recipe in config.recipes:
        report["recipes"][recipe.name] = compare_heads(
            pool, states, runner, recipe, config, heads_config, progress=progress,
            on_fold=None if on_fold is None else functools.partial(on_fold, recipe.name))
    return report


def _f(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def heads_markdown(report: dict[str, Any]) -> str:
    """heads.md: per recipe, one row per held-out group (AUROC / accuracy / FPR of each head), means, FLOPs."""
    lines = ["# Probe heads under leave-source-out", ""]
    for name, run in report["recipes"].items():
        heads = run["heads"]
        lines += [f"## Recipe `{name}` (block {run['block']} retrained: {run['training']})", "",
                  "| held-out group | n (harmful) | " + " | ".join(f"{h} AUROC / acc / FPR" for h in heads)
                  + " | majority |", "|---|---|" + "---|" * (len(heads) + 1)]
        for group, row in run["groups"].items():
            if "skipped" in row:
                lines.append(f"| {group} | skipped: {row['skipped']} |")
                continue
            first = row[heads[0]]
            cells = [f"{_f(row[h]['auroc'])} / {_f(row[h]['accuracy'])} / {_f(row[h]['fpr'])}" for h in heads]
            lines.append(f"| {group} | {first['n']} ({first['positives']}) | " + " | ".join(cells)
                         + f" | {_f(first['majority_rate'])} |")
        lines += ["", ("| head | mean AUROC | mean acc | mean majority | above majority | mean FPR | FPR <= 2ε | "
                       "recall (harmful-only) | FPR (benign-only) | s/fold | FLOPs/token |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for h in heads:
            m = run["mean"][h]
            lines.append(f"| {h} | {_f(m['auroc'])} | {_f(m['accuracy'])} | {_f(m['majority_rate'])} | "
                         f"{m['above_majority']}/{m['groups_both_classes']} | {_f(m['fpr'])} | "
                         f"{m['fpr_within_2eps']}/{m['groups_both_classes']} | {_f(m['recall_harmful_only'])} | "
                         f"{_f(m['fpr_benign_only'])} | {m['seconds_per_fold']:.1f} | {run['flops'][h]:.3g} |")
        fl = run["flops"]
        lines += ["", (f"Monitored pass to block {run['block']}: {fl['monitored_pass_per_token']:.3g} FLOPs/token "
                       f"(mean record {fl['mean_tokens']:.0f} tokens); one block {fl['block_per_token']:.3g}. The "
                       "retrained block replacing the probe layer's own adds "
                       f"{fl['block_replacing_probe_layer']:.3g} FLOPs/token over that pass (the linear head's cost)."),
                  ""]
    return "\n".join(lines)
