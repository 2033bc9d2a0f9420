"""Recipes (how a fold's training set is built), the run's configuration, and the folds themselves."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field

from probes.cache import sha256_text
from probes.config import DEFAULT_FILES, Frozen
from probes.evaluation.generalization.pool import PoolConfig, PoolRecord, Variant

F64 = npt.NDArray[np.float64]


class Recipe(Frozen):
    """How the training set of a fold is built, and which probe features and unsafe cut it uses."""

    name: str
    files: tuple[str, ...] | None = Field(None, description="training files (None: every pool file)")
    max_per_source: int | None = Field(None, ge=1, description="seeded hard cap per file (today's recipe: 150)")
    balance_with: str | None = Field(None, description="file of label-0 rows subsampled to match the positives")
    source_budget: float | None = Field(
        None, gt=0, description="per-file weight budget: a file of n rows weighs min(1, budget/n) per row")
    class_balance: bool = Field(False, description="reweight so both classes carry the same total weight")
    source_class_balance: bool = Field(
        False, description="within each file holding both classes, both classes carry the same weight (the "
        "file's style says nothing about the label)")
    group_budget: float | None = Field(
        None, gt=0, description="per-group weight budget: a group's rows together weigh at most this (a group of "
        "many files does not outweigh a group of one)")
    dedup: bool = Field(False, description="drop near-duplicates (normalised text hash) across training files")
    variants: tuple[Variant, ...] = ((15, "mean"),)
    cut: Literal["fixed", "fpr"] = Field("fixed", description="fixed: 0.5; fpr: certified benign flag rate <= epsilon")
    epsilon: float = Field(0.05, gt=0, lt=1)
    c: float = Field(0.5, gt=0, description="inverse L2 strength of the probe")


#: Today's recipe (``./scripts/evaluate.sh``): the 18 default files, 150 per source, alpaca-balanced,
#: mean-pooled layer 15, the literal 0.5 cut.
BEFORE = Recipe(name="before", files=DEFAULT_FILES, max_per_source=150, balance_with="alpaca_benign.jsonl")


class ExpertChoice(Frozen):
    kind: Literal["frozen", "finetune"] = Field(
        "frozen", description="frozen: sentence-encoder embeddings + a logistic head refit per fold (cheap); "
        "finetune: the encoder-head expert fine-tuned per fold (slow on a CPU)")
    spec: str = "all-mpnet-base-v2"
    max_tokens: int = 320
    c: float = Field(1.0, gt=0)


class LosoConfig(Frozen):
    pool: PoolConfig = PoolConfig()
    recipes: tuple[Recipe, ...] = Field((), description="extra named recipes (the CLI adds before and after)")
    probe_spec: str = "smollm2-135m-instruct"
    probe_max_tokens: int = 256
    dtype: str = "auto"
    expert: ExpertChoice = ExpertChoice()
    alphas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    delta: float = Field(0.1, gt=0, lt=1)
    calibration_fraction: float = Field(0.3, gt=0, lt=1)
    dv_feature_sets: tuple[str, ...] = Field(
        ("margin", "extras"), description="DV feature sets tried by cross-validation; 'full' (all activations) "
        "costs ~300 extra fits per fold, too slow for a shared CPU")
    adapt_audits: int = Field(
        0, ge=0, description="audited items of the held-out group the online recalibration learns from (0: off); "
        "see adapt_fold")
    adapt_head_l2: float = Field(1.0, gt=0, description="audit.head_l2 of the adapted head")
    adapt_epsilon: float | None = Field(
        None, gt=0, lt=1, description="audit.epsilon of the adaptation's certified cut (None: the recipe's epsilon)")
    seed: int = 0


@dataclass
class Fold:
    group: str
    fit: npt.NDArray[np.int64]
    calibration: npt.NDArray[np.int64]
    test: npt.NDArray[np.int64]
    weights: F64  # per fit row



def _unit(seed: int, key: str) -> float:
    return int(sha256_text(str(seed), key)[:16], 16) / 16.0**16


def make_fold(pool: Sequence[PoolRecord], group: str, recipe: Recipe, *, calibration_fraction: float,
              seed: int = 0) -> Fold:
    """Indices of one fold: the held-out group is the test set; nothing of it (by file or by normalised
    text) reaches the fit or calibration rows."""
    test = [i for i, p in enumerate(pool) if p.group == group]
    held_files = {pool[i].record.file for i in test}
    held_text = {pool[i].dedup_key for i in test}
    allowed = set(recipe.files) if recipe.files is not None else None
    by_file: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pool):
        if p.group == group or p.record.file in held_files or p.dedup_key in held_text:
            continue
        if allowed is not None and p.record.file not in allowed:
            continue
        by_file[p.record.file].append(i)
    rng = random.Random(seed)
    kept: list[int] = []
    for name in sorted(by_file):
        if name == recipe.balance_with:
            continue
        rows = by_file[name]
        if recipe.max_per_source is not None and len(rows) > recipe.max_per_source:
            rows = rng.sample(rows, recipe.max_per_source)
        kept.extend(rows)
    if recipe.balance_with is not None and recipe.balance_with in by_file:
        positives = sum(pool[i].record.label for i in kept)
        pool_rows = by_file[recipe.balance_with]
        kept.extend(rng.sample(pool_rows, min(len(pool_rows), max(0, 2 * positives - len(kept)))))
    if recipe.dedup:
        seen: set[str] = set()
        unique = []
        for i in sorted(kept, key=lambda i: (pool[i].record.file, pool[i].record.id)):
            if pool[i].dedup_key not in seen:
                seen.add(pool[i].dedup_key)
                unique.append(i)
        kept = unique
    kept.sort()
    cal = [i for i in kept if _unit(seed, pool[i].side_key) < calibration_fraction]
    fit = [i for i in kept if _unit(seed, pool[i].side_key) >= calibration_fraction]
    return Fold(group, np.asarray(fit, dtype=np.int64), np.asarray(cal, dtype=np.int64),
                np.asarray(test, dtype=np.int64), source_weights(pool, fit, recipe))


def source_weights(pool: Sequence[PoolRecord], rows: Sequence[int], recipe: Recipe) -> F64:
    """Per-row weights: each file's total capped by the budget, both classes alike within a two-class file (when
    asked), each group's total capped, then both classes brought to equal totals."""
    files = [pool[i].record.file for i in rows]
    labels = np.asarray([pool[i].record.label for i in rows])
    counts: dict[str, int] = defaultdict(int)
    for name in files:
        counts[name] += 1
    w = np.ones(len(rows), dtype=np.float64)
    if recipe.source_budget is not None:
        w = np.asarray([min(1.0, recipe.source_budget / counts[name]) for name in files], dtype=np.float64)
    if recipe.source_class_balance:
        for name in counts:
            in_file = np.asarray([f == name for f in files])
            if 0 < labels[in_file].sum() < in_file.sum():
                total = w[in_file].sum()
                for cls in (0, 1):
                    mask = in_file & (labels == cls)
                    w[mask] *= 0.5 * total / w[mask].sum()
    if recipe.group_budget is not None:
        groups = np.asarray([pool[i].group for i in rows])
        for group in set(groups.tolist()):
            mask = groups == group
            w[mask] *= min(1.0, recipe.group_budget / w[mask].sum())
    if recipe.class_balance and len(rows) and 0 < labels.sum() < len(labels):
        for cls in (0, 1):
            mask = labels == cls
            w[mask] *= 0.5 * w.sum() / w[mask].sum()
    return w * (len(w) / w.sum()) if len(w) and w.sum() > 0 else w



def audit_half(pool: Sequence[PoolRecord], rows: npt.NDArray[np.int64], seed: int) -> npt.NDArray[np.bool_]:
    """Which of ``rows`` may be audited when adaptation is measured: a content-hash half. The other half is what
    the figures are computed on, so a refit head is never scored on a record it was taught."""
    return np.asarray([_unit(seed, f"adapt:{pool[i].key}") < 0.5 for i in rows], dtype=np.bool_)


#: The recipe this module recommends (see docs/generalization.md for how it was picked): every pool file,
#: per-file weight budget, both classes at equal weight, near-duplicates dropped, the certified FPR cut.
AFTER = Recipe(name="after", source_budget=50.0, class_balance=True, dedup=True, cut="fpr", epsilon=0.05)
#: Issue 21's recipe for the broad set (BROAD_GROUPS): AFTER, with each two-class file balanced within itself and
#: each group's weight capped, so no group of many files (or one huge tweet set) outweighs the others.
BROAD = Recipe(name="broad", source_budget=50.0, class_balance=True, source_class_balance=True, group_budget=150.0,
               dedup=True, cut="fpr", epsilon=0.05)
