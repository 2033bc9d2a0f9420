"""Padded training for the token-level scorer: long benign texts and padded fit records, read at the long bound.

Trained on pool records of at most 256 tokens, the token scorer's max over rolling means rises with length: a
3k-token benign filler alone scores 0.99 (docs/generalization.md, "A token-level conversation scorer"). Its
positions past 256 tokens were never fitted nor calibrated. This option trains and calibrates it at the read bound:

- **padded rows** (training): fit-split single-turn records of the fold with benign filler before, after or around
  them, each with its record's label and weight (half harmful, half benign);
- **filler alone** (training negatives): long benign texts;
- **long calibration rows**: more long benign texts, added to the fold's benign calibration rows before the cut is
  certified, so the certified cut has seen the read bound.

The filler comes from a benign source that is **not** the yardstick's (``dilution.FILLER_FILE``, Alpaca), nor a
file the fold holds out, nor a request file: the yardstick's filler stays unseen (``check_filler_file``). The
first configured source the fold does not hold out is used (leave-source-out holds out each in turn). Its
benign records are split into training and calibration filler by the fold's own side hash, so a record the fold
calibrates on never pads a training row and vice versa. Which records are padded, where and by how much depends
on the record (a hash of its key), not on the fold, so the folds of leave-source-out share most long texts;
states are read at the long bound and cached per content key (``token_states``): a rerun reads nothing.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field

from probes.activations.token_states import F16, record_token_states
from probes.config import Frozen
from probes.conversation import Conversation, single_turn
from probes.data import Record, read_file
from probes.evaluation.dilution import FILLER_FILE, REQUEST_FILES, FillerSource, in_filler
from probes.evaluation.generalization.folds import Fold, LosoConfig, Recipe, _unit
from probes.evaluation.generalization.pool import PoolRecord
from probes.evaluation.generalization.scoring import certified_cut
from probes.fitting.token_scorer import TokenScorerFit, fit_token_scorer
from probes.heads.token_scorer import TokenScorer

F64 = npt.NDArray[np.float64]
#: Where the filler goes around a padded record (the yardstick's placements but its window gap).
PLACES = ("before", "after", "around")


class TokenPadding(Frozen):
    """How many long texts the padded token scorer reads, of which lengths, from which benign source."""

    filler_files: tuple[str, ...] = Field(("convabuse.conversations.jsonl", "dices_990.conversations.jsonl"),
                                          min_length=1, description=(
        "benign sources of the filler (label-0 records, message contents joined), the first one the fold does not "
        "hold out is used: never the yardstick's"))
    padded: int = Field(48, ge=0, description="fit records padded with filler (half harmful, half benign)")
    filler_only: int = Field(24, ge=0, description="long benign filler texts alone, as training negatives")
    calibration: int = Field(24, ge=0, description="long benign filler texts alone, added to the calibration rows")
    lengths: tuple[int, ...] = Field((256, 1024, 3072), description="filler lengths in the model's tokens, cycled")
    seed: int = 0


def _source(name: str) -> str:
    """A dataset file's source: ``convabuse.conversations.jsonl`` and ``convabuse.jsonl`` are the same texts."""
    return name.split(".", 1)[0]


def check_filler_file(name: str, held_out_files: Sequence[str] = ()) -> None:
    """Refuse a filler that would leak the yardstick: its own filler, its request files, or a held-out source
    (compared by source, so another file of the same texts is refused too)."""
    if _source(name) == _source(FILLER_FILE):
        raise ValueError(f"{name} is the dilution yardstick's filler: training on it would measure nothing")
    if _source(name) in {_source(f) for f in (*REQUEST_FILES, *held_out_files)}:
        raise ValueError(f"{name} is held out by this fold (or is a yardstick request file)")


def filler_file(padding: TokenPadding, held_out_files: Sequence[str]) -> str:
    """The first configured filler source the fold does not hold out (the yardstick's own is always refused)."""
    for name in padding.filler_files:
        check_filler_file(name)
    held = {_source(f) for f in held_out_files}
    usable = [name for name in padding.filler_files if _source(name) not in held]
    if not usable:
        raise ValueError(f"every filler source ({', '.join(padding.filler_files)}) is held out by this fold")
    return usable[0]


def filler_texts(datasets_dir: Path, name: str, *, seed: int, calibration_fraction: float) -> tuple[
        list[str], list[str]]:
    """The filler source's benign texts, split (training, calibration) by the side hash ``make_fold`` uses."""
    train: list[str] = []
    cal: list[str] = []
    for r in read_file(datasets_dir / name):
        if r.label != 0:
            continue
        text = "\n".join(m.content.strip() for m in r.messages if m.content.strip())
        if text:
            (cal if _unit(seed, r.twin_key()) < calibration_fraction else train).append(text)
    return train, cal


@dataclass(frozen=True)
class PaddedRows:
    """Conversations to read at the long bound, with their labels and weights (weights 0 for calibration rows)."""

    conversations: list[Conversation]
    labels: npt.NDArray[np.int64]
    weights: F64
    kinds: list[str]  # "padded" | "filler" | "calibration"
    lengths: list[int]  # filler tokens of each
    filler_file: str  # the benign source the filler came from


def pad(text: str, filler: FillerSource, n: int, place: str, seed: int) -> str:
    """``text`` with ``n`` filler tokens before, after, or half on each side of it (as the yardstick joins them)."""
    return in_filler(text, filler.tokenizer, filler.tokens(n, seed), {"before": n, "after": 0, "around": n // 2}[place])


def _draw(seed: int, key: str, n: int) -> int:
    """A number in [0, n) fixed by the record's key: the same record is padded alike in every fold."""
    return int(_unit(seed, key) * n)


def padded_rows(pool: Sequence[PoolRecord], fold: Fold, padding: TokenPadding, tokenizer: Any,
                datasets_dir: Path, *, calibration_fraction: float, seed: int = 0) -> PaddedRows:
    """The fold's padded training rows and long calibration rows (``TokenPadding``)."""
    name = filler_file(padding, sorted({pool[i].record.file for i in fold.test}))
    train_texts, cal_texts = filler_texts(datasets_dir, name, seed=seed, calibration_fraction=calibration_fraction)
    train_filler, cal_filler = FillerSource(tokenizer, train_texts), FillerSource(tokenizer, cal_texts)
    weights = dict(zip(fold.fit.tolist(), (fold.weights / fold.weights.mean()).tolist(), strict=True))
    single = sorted((i for i in fold.fit.tolist() if len(pool[i].record.messages) == 1
                     and pool[i].record.messages[0].role == "user"),
                    key=lambda i: _unit(padding.seed, pool[i].key))
    chosen: list[int] = []
    for label, share in ((1, (padding.padded + 1) // 2), (0, padding.padded // 2)):
        chosen += [i for i in single if pool[i].record.label == label][:share]
    conversations: list[Conversation] = []
    labels: list[int] = []
    ws: list[float] = []
    kinds: list[str] = []
    lengths: list[int] = []

    def add(text: str, label: int, weight: float, kind: str, n: int) -> None:
        conversations.append(single_turn(text))
        labels.append(label)
        ws.append(weight)
        kinds.append(kind)
        lengths.append(n)

    grid = [(n, place) for n in padding.lengths for place in PLACES]
    for i in chosen:
        key = pool[i].key
        n, place = grid[_draw(padding.seed, "place:" + key, len(grid))]
        record: Record = pool[i].record
        add(pad(record.messages[0].content, train_filler, n, place, _draw(padding.seed, "filler:" + key, 2**31)),
            record.label, weights[i], "padded", n)
    rng = random.Random(f"{padding.seed}:{name}")
    for k in range(padding.filler_only):
        n = padding.lengths[k % len(padding.lengths)]
        add(train_filler.text(n, rng.randrange(2**31)), 0, 1.0, "filler", n)
    for k in range(padding.calibration):
        n = padding.lengths[k % len(padding.lengths)]
        add(cal_filler.text(n, rng.randrange(2**31)), 0, 0.0, "calibration", n)
    return PaddedRows(conversations, np.asarray(labels, dtype=np.int64), np.asarray(ws, dtype=np.float64), kinds,
                      lengths, name)


def read_padded(cache_dir: Path, rows: PaddedRows, extractor: Any,
                progress: Callable[[int], None] | None = None) -> list[F16]:
    """Token states of the padded rows at the extractor's (long) bound, cached per content key."""
    keys = [Record(id="", messages=c, label=0, source="").content_key() for c in rows.conversations]
    states, _ = record_token_states(cache_dir, extractor, rows.conversations, keys, progress)
    return states


def summary(rows: PaddedRows, states: Sequence[F16]) -> dict[str, Any]:
    """What the padded rows were: counts per kind and label, tokens read."""
    out: dict[str, Any] = {"filler_file": rows.filler_file, "tokens": int(sum(s.shape[0] for s in states)),
                           "rows": {}}
    for kind in ("padded", "filler", "calibration"):
        idx = [i for i, k in enumerate(rows.kinds) if k == kind]
        out["rows"][kind] = {"n": len(idx), "unsafe": int(sum(rows.labels[i] for i in idx)),
                             "lengths": sorted({rows.lengths[i] for i in idx})}
    return out


@dataclass(frozen=True)
class PaddedFit:
    scorer: TokenScorer
    cut: float | None  # certified on the fold's benign calibration rows and the long benign ones
    summary: dict[str, Any]


def fit_padded(pool: Sequence[PoolRecord], fold: Fold, states: Sequence[F16], y: npt.NDArray[np.int64],
               fit: TokenScorerFit, padding: TokenPadding, extractor: Any, *, recipe: Recipe, config: LosoConfig,
               cache_dir: Path, datasets_dir: Path, skip: int = 0) -> PaddedFit:
    """The token scorer fitted on the fold's fit rows plus its padded rows, its cut certified on the fold's benign
    calibration rows plus the long benign ones (``recipe.cut`` fixed: 0.5)."""
    rows = padded_rows(pool, fold, padding, extractor.loaded.tokenizer, datasets_dir,
                       calibration_fraction=config.calibration_fraction, seed=config.seed)
    long_states = read_padded(cache_dir, rows, extractor)
    train = [i for i, k in enumerate(rows.kinds) if k != "calibration"]
    long_cal = [i for i, k in enumerate(rows.kinds) if k == "calibration"]
    weights = np.concatenate([fold.weights / fold.weights.mean(), rows.weights[train]])
    _, scorer = fit_token_scorer([*(states[i] for i in fold.fit), *(long_states[i] for i in train)],
                                 np.concatenate([y[fold.fit], rows.labels[train]]), weights, fit, skip=skip)
    benign = fold.calibration[y[fold.calibration] == 0]
    cal = scorer.proba([*(states[i] for i in benign), *(long_states[i] for i in long_cal)])
    cut = certified_cut(cal, epsilon=recipe.epsilon, delta=config.delta) if recipe.cut == "fpr" else 0.5
    long_p = scorer.proba([long_states[i] for i in long_cal])
    return PaddedFit(scorer, cut, {
        **padding.model_dump(mode="json"), **summary(rows, long_states),
        "calibration_rows": {"short_benign": len(benign), "long_benign": len(long_cal)},
        "long_calibration_mean_p": float(np.mean(long_p)) if len(long_p) else None})
