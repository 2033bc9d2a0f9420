"""The pool: a seeded sample of every source group's files, with its probe features and expert embeddings
(cached per record)."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import Field

from probes.activations.normalise import normalise
from probes.cache import sha256_text
from probes.config import Frozen
from probes.data import Record, read_file

F32 = npt.NDArray[np.float32]


class SourceGroup(Frozen):
    """Files held out together (related sources would leak into each other otherwise)."""

    name: str
    files: tuple[str, ...]


#: The default groups. Prompt sets that share behaviours (AdvBench/HarmBench/TDC/JBB/...) are one group,
#: XSTest goes with its completions (same prompts), do-not-answer with its responses, the dialogue sets
#: together, CoSafe's seed prompts with its dialogues. hh-rlhf is left out: its labels are relative.
DEFAULT_GROUPS: tuple[SourceGroup, ...] = (
    SourceGroup(name="xstest", files=("xstest.jsonl", "xstest_completions.conversations.jsonl")),
    SourceGroup(name="forbidden_questions", files=("forbidden_questions.jsonl",)),
    SourceGroup(name="dialogues", files=("dices_990.conversations.jsonl", "cosafe.conversations.jsonl",
                                         "cosafe_single_prompts.jsonl")),
    SourceGroup(name="refusal_completions", files=("refusal_direction_completions.conversations.jsonl",)),
    SourceGroup(name="tweets", files=("davidson_hate_offensive.jsonl",)),
    SourceGroup(name="jailbreaks", files=("jailbreak_prompts_itw.jsonl",)),
    SourceGroup(name="harmful_behaviors", files=(
        "advbench.jsonl", "harmbench.jsonl", "jailbreakbench_behaviors.jsonl", "strongreject.jsonl",
        "malicious_instruct.jsonl", "tdc2023.jsonl", "simple_safety_tests.jsonl", "tense_reformulations.jsonl")),
    SourceGroup(name="harmful_questions", files=(
        "harmfulqa.jsonl", "catqa.jsonl", "dangerousqa.jsonl", "do_not_answer.jsonl",
        "do_not_answer_responses.conversations.jsonl")),
    SourceGroup(name="alpaca", files=("alpaca_benign.jsonl",)),
)

#: Issue 21's groups: the default ones (tweets now with TweetEval's hate and offensive tweets, the same style)
#: and one per contrastive source family, each holding both classes in one style.
BROAD_GROUPS: tuple[SourceGroup, ...] = (
    *(g if g.name != "tweets" else SourceGroup(name="tweets", files=(
        "davidson_hate_offensive.jsonl", "tweeteval_hate.jsonl", "tweeteval_offensive.jsonl"))
      for g in DEFAULT_GROUPS),
    SourceGroup(name="over_refusal_contrast", files=("coconot.jsonl",)),
    SourceGroup(name="hate_functional", files=("hatecheck.jsonl", "hatemoji.jsonl")),
    SourceGroup(name="chat_abuse", files=("convabuse.conversations.jsonl",)),
    SourceGroup(name="sexism", files=("edos.jsonl",)),
    SourceGroup(name="response_safety", files=("diasafety.conversations.jsonl",)),
)


class PoolConfig(Frozen):
    """Which records enter the pool: a seeded sample of each file of every group."""

    groups: tuple[SourceGroup, ...] = DEFAULT_GROUPS
    per_file: int = Field(50, ge=2, description="records sampled per file")
    per_file_overrides: dict[str, int] = Field(default_factory=lambda: {"alpaca_benign.jsonl": 250})
    seed: int = 0


@dataclass(frozen=True)
class PoolRecord:
    record: Record
    group: str
    key: str  # content hash: the record-cache key
    dedup_key: str  # normalised text hash: near-duplicates across sources share it
    twin: str = ""  # Record.twin_key: twins (pairs, template families, replies to one context) share a side

    @property
    def side_key(self) -> str:
        """What decides fit vs calibration: twins always land on the same side."""
        return self.twin or self.key


_PUNCT = re.compile(r"[\W_]+", re.UNICODE)


def normalised_text_hash(record: Record) -> str:
    """Hash of the text, normalised as the probe reads it (probes/activations/normalise.py), case-folded, with
    punctuation and whitespace runs collapsed.

    Catches the same prompt copied between sources with different spacing, quotes or casing (TDC repeats
    HarmBench; XSTest completions embed XSTest prompts only as a prefix, so they stay distinct records).
    """
    text = normalise("\n".join(m.content for m in record.messages)).casefold()
    return sha256_text(" ".join(_PUNCT.sub(" ", text).split()))[:32]


def build_pool(datasets_dir: Path, config: PoolConfig) -> list[PoolRecord]:
    """A seeded sample of every group's files; the same config always gives the same records, in order."""
    out: list[PoolRecord] = []
    for group in config.groups:
        for name in group.files:
            records = read_file(datasets_dir / name)
            cap = config.per_file_overrides.get(name, config.per_file)
            # A seeded shuffle, then a prefix: a larger cap keeps every record of a smaller one (cache reuse).
            random.Random(f"{config.seed}:{name}").shuffle(records)
            records = records[:cap]
            out.extend(PoolRecord(r, group.name, r.content_key(), normalised_text_hash(r), r.twin_key())
                       for r in records)
    return out


def fill_expert_embeddings(
    cache_dir: Path, pool: Sequence[PoolRecord], *, spec: str = "all-mpnet-base-v2", max_tokens: int = 320,
    dtype: str = "auto", progress: Callable[[int], None] | None = None,
) -> tuple[F32, int, str]:
    """Frozen-expert embeddings (mean-pooled last block of the sentence encoder), cached per record.

    Returns (embeddings, records computed, the backbone's id for reports).
    """
    from probes.activations.features import MultiLayerExtractor, record_features
    from probes.activations.models import load_model

    loaded = load_model(spec, cache_dir=cache_dir, dtype=dtype)
    extractor = MultiLayerExtractor(loaded, layers=[loaded.num_layers], max_tokens=max_tokens,
                                    batch_tokens=8192, max_items=64)
    variant = (loaded.num_layers, "mean")
    feats, computed = record_features(cache_dir, extractor, [p.record.messages for p in pool],
                                      [p.key for p in pool], [variant], progress)
    return feats[variant], computed, f"{spec}@{loaded.weights_sha256[:12]}:{variant[0]}:mean:{max_tokens}"


def fill_probe_features(
    cache_dir: Path, pool: Sequence[PoolRecord], variants: Sequence[tuple[int, str]], *,
    spec: str = "smollm2-135m-instruct", max_tokens: int = 256, dtype: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[tuple[int, str], F32], int]:
    """Probe features of every (layer, pooling) variant, cached per record; one forward per missing record."""
    from probes.activations.features import MultiLayerExtractor, record_features
    from probes.activations.models import load_model

    layers = sorted({layer for layer, _ in variants})
    loaded = load_model(spec, cache_dir=cache_dir, dtype=dtype, max_layer=layers[-1])
    extractor = MultiLayerExtractor(loaded, layers=layers, max_tokens=max_tokens, batch_tokens=8192, max_items=64)
    return record_features(cache_dir, extractor, [p.record.messages for p in pool], [p.key for p in pool],
                           list(variants), progress)


Variant = tuple[int, str]  # (layer, pooling) of the probe features
