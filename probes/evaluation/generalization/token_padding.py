"""Padded training for the token-level scorer: long benign texts and padded fit records, read at the long bound.

Trained on pool records of at most 256 tokens, the token scorer's max over rolling means rises with length: a
3k-token benign filler alone scores 0.99 (docs/generalization.md, "A token-level conversation scorer"). Its
positions past 256 tokens were never fitted nor calibrated. This option trains and calibrates it at the read bound:

- **padded rows** (training): fit-split single-turn records of the fold with benign filler before, after or around
  them, each with its record's label and weight (half harmful, half benign);
- **filler alone** (training negatives): long benign texts;
- **long calibration rows**: more long benign texts, added to the fold's benign calibration rows before the cut is
  certified, so the certified cut has seen the read bound.

The filler comes from one benign source that is **not** the yardstick's (``dilution.FILLER_FILE``, Alpaca), nor a
file the fold holds out, nor a request file: the yardstick's filler stays unseen (``check_filler_file``). Its
benign records are split into training and calibration filler by the fold's own side hash, so a record the fold
calibrates on never pads a training row and vice versa. States are read at the long bound and cached per content
key (``token_states``): a rerun reads nothing.
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
from probes.evaluation.dilution import FILLER_FILE, REQUEST_FILES, SEPARATOR, FillerSource
from probes.evaluation.generalization.folds import Fold, _unit
from probes.evaluation.generalization.pool import PoolRecord

F64 = npt.NDArray[np.float64]
#: Where the filler goes around a padded record (the yardstick's placements but its window gap).
PLACES = ("before", "after", "around")


class TokenPadding(Frozen):
    """How many long texts the padded token scorer reads, of which lengths, from which benign source."""

    filler_file: str = Field("convabuse.conversations.jsonl", description=(
        "benign source of the filler (its label-0 records, message contents joined): never the yardstick's"))
    padded: int = Field(48, ge=0, description="fit records padded with filler (half harmful, half benign)")
    filler_only: int = Field(24, ge=0, description="long benign filler texts alone, as training negatives")
    calibration: int = Field(24, ge=0, description="long benign filler texts alone, added to the calibration rows")
    lengths: tuple[int, ...] = Field((256, 1024, 3072), description="filler lengths in the model's tokens, cycled")
    seed: int = 0


def check_filler_file(name: str, held_out_files: Sequence[str]) -> None:
    """Refuse a filler that would leak the yardstick: its own filler, its request files, or a held-out file."""
    if name == FILLER_FILE:
        raise ValueError(f"{name} is the dilution yardstick's filler: training on it would measure nothing")
    if name in REQUEST_FILES or name in set(held_out_files):
        raise ValueError(f"{name} is held out by this fold (or is a yardstick request file)")


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


def pad(text: str, filler: FillerSource, n: int, place: str, seed: int) -> str:
    """``text`` with ``n`` filler tokens before, after, or half on each side of it (as the yardstick joins them)."""
    tok = filler.tokenizer
    ids = filler.tokens(n, seed)
    split = {"before": n, "after": 0, "around": n // 2}[place]
    head = str(tok.decode(ids[:split])).strip() if split else ""
    tail = str(tok.decode(ids[split:])).strip() if split < n else ""
    return SEPARATOR.join(part for part in (head, text, tail) if part)


def padded_rows(pool: Sequence[PoolRecord], fold: Fold, padding: TokenPadding, tokenizer: Any,
                datasets_dir: Path, *, calibration_fraction: float, seed: int = 0) -> PaddedRows:
    """The fold's padded training rows and long calibration rows (``TokenPadding``)."""
    held = sorted({pool[i].record.file for i in fold.test})
    check_filler_file(padding.filler_file, held)
    train_texts, cal_texts = filler_texts(datasets_dir, padding.filler_file, seed=seed,
                                          calibration_fraction=calibration_fraction)
    train_filler, cal_filler = FillerSource(tokenizer, train_texts), FillerSource(tokenizer, cal_texts)
    rng = random.Random(f"{padding.seed}:{fold.group}")
    weights = dict(zip(fold.fit.tolist(), (fold.weights / fold.weights.mean()).tolist(), strict=True))
    single = [i for i in fold.fit.tolist() if len(pool[i].record.messages) == 1
              and pool[i].record.messages[0].role == "user"]
    chosen: list[int] = []
    for label, share in ((1, (padding.padded + 1) // 2), (0, padding.padded // 2)):
        rows = [i for i in single if pool[i].record.label == label]
        chosen += rng.sample(rows, min(share, len(rows)))
    out = PaddedRows([], np.zeros(0, dtype=np.int64), np.zeros(0), [], [])
    labels: list[int] = []
    ws: list[float] = []
    lengths = padding.lengths

    def add(text: str, label: int, weight: float, kind: str, n: int) -> None:
        out.conversations.append(single_turn(text))
        labels.append(label)
        ws.append(weight)
        out.kinds.append(kind)
        out.lengths.append(n)

    for k, i in enumerate(chosen):
        n, place = lengths[k % len(lengths)], PLACES[(k // len(lengths)) % len(PLACES)]
        record: Record = pool[i].record
        add(pad(record.messages[0].content, train_filler, n, place, rng.randrange(2**31)), record.label,
            weights[i], "padded", n)
    for k in range(padding.filler_only):
        n = lengths[k % len(lengths)]
        add(train_filler.text(n, rng.randrange(2**31)), 0, 1.0, "filler", n)
    for k in range(padding.calibration):
        n = lengths[k % len(lengths)]
        add(cal_filler.text(n, rng.randrange(2**31)), 0, 0.0, "calibration", n)
    return PaddedRows(out.conversations, np.asarray(labels, dtype=np.int64), np.asarray(ws, dtype=np.float64),
                      out.kinds, out.lengths)


def read_padded(cache_dir: Path, rows: PaddedRows, extractor: Any,
                progress: Callable[[int], None] | None = None) -> list[F16]:
    """Token states of the padded rows at the extractor's (long) bound, cached per content key."""
    keys = [Record(id="", messages=c, label=0, source="").content_key() for c in rows.conversations]
    states, _ = record_token_states(cache_dir, extractor, rows.conversations, keys, progress)
    return states


def summary(rows: PaddedRows, states: Sequence[F16], filler_file: str) -> dict[str, Any]:
    """What the padded rows were: counts per kind and label, tokens read."""
    out: dict[str, Any] = {"filler_file": filler_file, "tokens": int(sum(s.shape[0] for s in states)), "rows": {}}
    for kind in ("padded", "filler", "calibration"):
        idx = [i for i, k in enumerate(rows.kinds) if k == kind]
        out["rows"][kind] = {"n": len(idx), "unsafe": int(sum(rows.labels[i] for i in idx)),
                             "lengths": sorted({rows.lengths[i] for i in idx})}
    return out
