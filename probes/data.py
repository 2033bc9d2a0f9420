"""Readers for the shared datasets (flat ``.jsonl`` and ``.conversations.jsonl``) and seeded splits.

Splits are assigned by a seeded hash of the conversation's *content*, so identical texts that appear in
two sources (TDC 2023 repeats HarmBench) always land in the same split: no leakage between splits. Twins — records
written as minimal edits of each other (Hatemoji ``pair_id``, HateCheck ``template_family``, hh-rlhf pairs, DiaSafety
replies to one context) — are assigned by their twin key instead, so a pair is never split across two splits.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from probes.activations.normalise import normalise
from probes.cache import sha256_file, sha256_text
from probes.config import DataConfig, SplitConfig
from probes.conversation import ROLES, Conversation, Message, single_turn
from probes.errors import DataError

SplitName = Literal["probe_train", "dev", "calibration", "evaluation"]
SPLITS: tuple[SplitName, ...] = ("probe_train", "dev", "calibration", "evaluation")


@dataclass(frozen=True)
class Record:
    """One labelled conversation."""

    id: str
    messages: Conversation
    label: int
    source: str
    category: str | None = None
    file: str = ""
    score: float | None = None
    extras: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def content_key(self) -> str:
        # On the text as every reader sees it (probes/activations/normalise.py): what normalisation rewrites gets a new key,
        # so no vector cached from the raw text is reused, and two spellings that read the same share one.
        return sha256_text(*(f"{m.role}\x1f{normalise(m.content).strip()}" for m in self.messages))

    def twin_key(self) -> str:
        """The key of the records that must share a split: the pair or template family this one was written in,
        DiaSafety's context (its replies differ in the last turn only), else the record's own content."""
        for name in TWIN_FIELDS:
            value = self.extras.get(name)
            if isinstance(value, str) and value:
                return f"{name}:{value}"
        if self.source in CONTEXT_TWINS and len(self.messages) > 1:
            return "context:" + sha256_text(*(f"{m.role}\x1f{normalise(m.content).strip()}" for m in self.messages[:-1]))
        return self.content_key()


#: Extras naming a group of minimally different records (datasets README): kept on one side of every split.
TWIN_FIELDS = ("pair_id", "template_family")
#: Sources whose records are several replies to one context: the context is the twin key.
CONTEXT_TWINS = frozenset({"diasafety"})


def _label(value: Any, path: Path, line: int) -> int:
    if value in (0, 1) and not isinstance(value, float | str):
        return int(value)
    if isinstance(value, bool):
        return int(value)
    raise DataError(f"field 'label' must be 0 or 1, got {value!r}", path=path, line=line)


def _str_field(obj: dict[str, Any], name: str, path: Path, line: int) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise DataError(f"missing or empty string field {name!r}", path=path, line=line)
    return value


def _messages(turns: Any, path: Path, line: int) -> Conversation:
    if not isinstance(turns, list) or not turns:
        raise DataError("field 'turns' must be a non-empty list", path=path, line=line)
    out: list[Message] = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise DataError("each turn needs a role (system/user/assistant) and string content", path=path, line=line)
        out.append(Message(turn["role"], turn["content"]))
    return tuple(out)


def read_file(path: Path | str) -> list[Record]:
    """Read one dataset file; the format follows the name (``*.conversations.jsonl`` or flat ``*.jsonl``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("dataset file not found", path=path)
    conversational = path.name.endswith(".conversations.jsonl")
    records: list[Record] = []
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise DataError(f"malformed JSON: {exc}", path=path, line=line_no) from exc
            if not isinstance(obj, dict):
                raise DataError("each line must be a JSON object", path=path, line=line_no)
            if conversational:
                rid = _str_field(obj, "conversation_id", path, line_no)
                messages = _messages(obj.get("turns"), path, line_no)
            else:
                rid = _str_field(obj, "id", path, line_no)
                messages = single_turn(_str_field(obj, "text", path, line_no))
            score = obj.get("score")
            category = obj.get("category")
            records.append(
                Record(
                    id=rid,
                    messages=messages,
                    label=_label(obj.get("label"), path, line_no),
                    source=str(obj.get("source") or path.name.split(".")[0]),
                    category=category if isinstance(category, str) else None,
                    file=path.name,
                    score=float(score) if isinstance(score, int | float) else None,
                    extras={k: obj[k] for k in ("prompt_label", "response_label", *TWIN_FIELDS) if k in obj},
                )
            )
    if not records:
        raise DataError("dataset file holds no records", path=path)
    return records


@dataclass(frozen=True)
class Dataset:
    records: tuple[Record, ...]
    file_hashes: dict[str, str]

    def content_hash(self) -> str:
        return sha256_text(*(f"{r.id}\x1e{r.content_key()}\x1e{r.label}" for r in self.records))

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]


def resolve_paths(datasets_dir: Path, files: Iterable[str | Path]) -> list[Path]:
    paths = []
    for name in files:
        candidate = Path(name)
        paths.append(candidate if candidate.is_absolute() or candidate.exists() else datasets_dir / candidate)
    return paths


def load_dataset(config: DataConfig, *, files: Sequence[str | Path] | None = None) -> Dataset:
    """Read, filter, cap per source and balance, as ``config`` says (all seeded, so reruns agree)."""
    paths = resolve_paths(config.datasets_dir, files if files is not None else config.files)
    records: list[Record] = []
    hashes: dict[str, str] = {}
    for path in paths:
        records.extend(read_file(path))
        hashes[path.name] = sha256_file(path)
    if config.sources:
        records = [r for r in records if r.source in config.sources]
    if config.categories:
        records = [r for r in records if r.category in config.categories]
    rng = random.Random(config.splits.seed)
    by_source: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_source[record.source].append(record)
    balance = config.balance_with if config.balance_with in by_source else None
    kept: list[Record] = []
    for source in sorted(by_source):
        if source == balance:
            continue
        group = by_source[source]
        if config.class_balance_per_source and 0 < sum(r.label for r in group) < len(group):
            kept.extend(class_balanced(group, config.max_per_source, rng))
            continue
        if config.max_per_source is not None and len(group) > config.max_per_source:
            group = rng.sample(group, config.max_per_source)
        kept.extend(group)
    if balance is not None:
        positives = sum(r.label for r in kept)
        negatives = len(kept) - positives
        pool = by_source[balance]
        wanted = min(len(pool), max(0, positives - negatives))
        kept.extend(rng.sample(pool, wanted))
    if not kept:
        raise DataError("no records left after filtering (check sources/categories)")
    kept.sort(key=lambda r: (r.source, r.id))
    return Dataset(records=tuple(kept), file_hashes=hashes)


def class_balanced(group: Sequence[Record], cap: int | None, rng: random.Random,
                   label: Callable[[Record], int] = lambda r: r.label) -> list[Record]:
    """As many records of each class (``label``): the smaller class's count, or half the cap."""
    classes = [[r for r in group if label(r) == cls] for cls in (0, 1)]
    k = min(len(c) for c in classes)
    if cap is not None:
        k = min(k, max(1, cap // 2))
    return [r for c in classes for r in (c if len(c) == k else rng.sample(c, k))]


def _unit_interval(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(frozen=True)
class Splits:
    probe_train: tuple[Record, ...]
    dev: tuple[Record, ...]
    calibration: tuple[Record, ...]
    evaluation: tuple[Record, ...]
    seed: int

    def get(self, name: SplitName) -> tuple[Record, ...]:
        return getattr(self, name)  # type: ignore[no-any-return]

    def sizes(self) -> dict[str, dict[str, int]]:
        return {
            name: {"n": len(self.get(name)), "positives": sum(r.label for r in self.get(name))} for name in SPLITS
        }


def split_dataset(dataset: Dataset, config: SplitConfig) -> Splits:
    """Disjoint seeded splits; the same seed and records always give the same assignment."""
    bounds: list[tuple[SplitName, float]] = []
    acc = 0.0
    for name in SPLITS:
        acc += getattr(config, name)
        bounds.append((name, acc))
    parts: dict[SplitName, list[Record]] = {name: [] for name in SPLITS}
    for record in dataset.records:
        u = _unit_interval(config.seed, record.twin_key())
        for name, upper in bounds:
            if u < upper or name == SPLITS[-1]:
                parts[name].append(record)
                break
    return Splits(
        probe_train=tuple(parts["probe_train"]),
        dev=tuple(parts["dev"]),
        calibration=tuple(parts["calibration"]),
        evaluation=tuple(parts["evaluation"]),
        seed=config.seed,
    )


def source_counts(records: Iterable[Record]) -> dict[str, int]:
    return dict(Counter(r.source for r in records))
