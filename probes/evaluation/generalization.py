"""Leave-source-out generalisation: train on some groups of sources, test on a group never seen.

Every figure before this module came from a random split of the training sources, which says little about
traffic from elsewhere. Here each *group* of related sources (a harmful prompt set with its benign
look-alikes, the dialogue sets, the response sets, the tweets, ...) is held out in turn: the probe, the
expert, the DV head, the unsafe cut and the delegation thresholds are all fitted on the other groups and
applied unchanged to the held-out one.

Cost model: the records of every group are sampled once into a *pool*; features (every layer/pooling
variant in one forward pass) and the frozen expert's embeddings are cached per record by content hash
(``probes.activations.record_cache``), so each recipe/variant is only cheap head fits on cached vectors.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field

from probes.activations.normalise import normalise
from probes.cache import sha256_text
from probes.config import DEFAULT_FILES, Frozen
from probes.conversation import Conversation
from probes.data import Record, read_file
from probes.heads.inference import LinearHead
from probes.logs import get_logger

log = get_logger(__name__)
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


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
    """Hash of the text, normalised as the probe reads it (probes/activations/normalise.py), case-folded, with punctuation and whitespace runs collapsed.

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


def _fit_head(x: F32, y: npt.NDArray[np.int64], w: F64, c: float, seed: int) -> Any:
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
        out[te] = _fit_head(x[tr], y[tr], w[tr], c, seed).proba(x[te])
    return out


def score_fold(fold: Fold, x: F32, e: F32, y: npt.NDArray[np.int64], recipe: Recipe, expert_c: float, *,
               delta: float, seed: int = 0, expert_scores: F64 | None = None) -> FoldScores:
    """Probe and expert fitted on the fold's fit rows, cut on its calibration rows, scored everywhere.

    ``expert_scores`` (per pool row) replaces the frozen expert when an expert was trained elsewhere.
    """
    fit, cal = fold.fit, fold.calibration
    probe = _fit_head(x[fit], y[fit], fold.weights, recipe.c, seed)
    p, p_oof = probe.proba(x), _oof(x[fit], y[fit], fold.weights, recipe.c, seed)
    if expert_scores is None:
        expert = _fit_head(e[fit], y[fit], fold.weights, expert_c, seed)
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


def audit_half(pool: Sequence[PoolRecord], rows: npt.NDArray[np.int64], seed: int) -> npt.NDArray[np.bool_]:
    """Which of ``rows`` may be audited when adaptation is measured: a content-hash half. The other half is what
    the figures are computed on, so a refit head is never scored on a record it was taught."""
    return np.asarray([_unit(seed, f"adapt:{pool[i].key}") < 0.5 for i in rows], dtype=np.bool_)


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
    from probes.heads.inference import uncertainty, with_extra_features
    from probes.runtime.manifest import Signal

    fit, cal, test = fold.fit, fold.calibration, fold.test
    signals: dict[str, F64] = {"uncertainty": uncertainty(s.p)}
    dv_info: dict[str, Any] = {}
    try:
        dv = fit_dv(x[fit], y[fit], s.p_oof, s.b_oof, target="binary", seed=seed,
                    feature_sets=tuple(dv_feature_sets))  # type: ignore[arg-type]
        signals["ctd"] = dv.head.proba(with_extra_features(x, s.p))
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


Progress = Callable[[str, int], Callable[[int], None]]


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda _n: None


def _stack(features: dict[Variant, F32], variants: Sequence[Variant]) -> F32:
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
                    progress: Progress = _no_progress, guard: Guard | None = None) -> dict[str, Any]:
    """Every held-out group under one recipe: per-group rows and their means."""
    y = np.asarray([p.record.label for p in pool], dtype=np.int64)
    x = _stack(features, recipe.variants)
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


ADAPTED_ROWS = ("offline", "expert", *(f"{mode}_{teacher}_guard" for teacher in ADAPT_GUARDS
                                       for mode in ("platt", "head")))


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
        x = _stack(features, combo)
        per_group: dict[str, Any] = {}
        for fold in folds:
            if len(np.unique(y[fold.fit])) < 2:
                continue
            probe = _fit_head(x[fold.fit], y[fold.fit], fold.weights, recipe.c, config.seed)
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


def run_loso(config: LosoConfig, *, cache_dir: Path, datasets_dir: Path, progress: Progress = _no_progress,
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


#: The recipe this module recommends (see docs/generalization.md for how it was picked): every pool file,
#: per-file weight budget, both classes at equal weight, near-duplicates dropped, the certified FPR cut.
AFTER = Recipe(name="after", source_budget=50.0, class_balance=True, dedup=True, cut="fpr", epsilon=0.05)
#: Issue 21's recipe for the broad set (BROAD_GROUPS): AFTER, with each two-class file balanced within itself and
#: each group's weight capped, so no group of many files (or one huge tweet set) outweighs the others.
BROAD = Recipe(name="broad", source_budget=50.0, class_balance=True, source_class_balance=True, group_budget=150.0,
               dedup=True, cut="fpr", epsilon=0.05)


def _f(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def _adapted_lines(groups: dict[str, Any], mean: dict[str, Any]) -> list[str]:
    rows = [n for n in ADAPTED_ROWS if n in mean]
    lines = ["### The guard teaches the probe (adapt_fold: audits of the held-out group, figures on its other half)",
             "", "| held-out group | audits | evaluated | " + " | ".join(f"{n} AUROC / acc / F1 / FPR" for n in
                                                               rows) + " | majority |",
             "|---|---|---|" + "---|" * (len(rows) + 1)]
    for group, row in groups.items():
        a = row.get("adapted")
        if not a or "skipped" in a:
            continue
        cells = [f"{_f(a[n]['auroc'])} / {_f(a[n]['accuracy'])} / {_f(a[n]['f1'])} / {_f(a[n]['fpr'])}"
                 + ("" if a[n].get("source", "window") == "window" else " (offline)") for n in rows]
        lines.append(f"| {group} | {a['audits']} | {a['evaluated']} | " + " | ".join(cells)
                     + f" | {_f(a['offline']['majority_rate'])} |")
    k = mean["groups_both_classes"]
    lines += ["", f"Means over the {k} two-class groups:", "",
              "| scorer | AUROC | accuracy | majority | F1 | FPR | acc > majority | FPR ≤ ε |", "|---|---|---|---|---|---|---|---|"]
    for name in rows:
        r = mean[name]
        lines.append(f"| {name} | {_f(r['auroc'])} | {_f(r['accuracy'])} | {_f(r['majority_rate'])} | {_f(r['f1'])} | "
                     f"{_f(r['fpr'])} | {r['above_majority']}/{k} | "
                     f"{r['fpr_within_epsilon'] if name not in ('offline', 'expert') else '–'}"
                     f"{'/' + str(k) if name not in ('offline', 'expert') else ''} |")
    return lines + [""]


def write_report(report: dict[str, Any], out: Path) -> Path:
    """report.md: per recipe, one row per held-out group and the means; then the feature sweep."""
    alpha_pick = 0.2 if 0.2 in report["config"]["alphas"] else report["config"]["alphas"][0]
    lines = ["# Leave-source-out generalisation", ""]
    if "pool" in report:
        lines += [(f"Pool: {report['pool']['n']} records ({report['pool']['positives']} unsafe), sampled per file; "
                   f"expert: {report['expert']}. Every row: probe, expert, DV and cuts fitted on the other groups "
                   "only."), ""]
    for name, result in report["recipes"].items():
        idx = report["config"]["alphas"].index(alpha_pick)
        lines += [f"## Recipe `{name}`", "", "```", str(result["recipe"]), "```", "",
                  (f"| held-out group | n | unsafe | majority | probe AUROC | expert AUROC | probe acc | probe P | "
                  f"probe R | probe F1 | probe FPR | TPR@1%FPR | ctd α={alpha_pick} acc | ctd F1 | "
                  f"unc. F1 | delegated |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for group, row in result["groups"].items():
            if "probe" not in row:
                lines.append(f"| {group} | – | – | – | skipped: {row['skipped']} |||||||||||")
                continue
            pr, ex = row["probe"], row["expert"]
            ctd = row["policies"].get("ctd", [{}] * (idx + 1))[idx]
            unc = row["policies"]["uncertainty"][idx]
            lines.append(
                f"| {group} | {pr['n']} | {pr['positives']} | {_f(pr['majority_rate'])} | {_f(pr['auroc'])} | "
                f"{_f(ex['auroc'])} | {_f(pr['accuracy'])} | {_f(pr['precision'])} | {_f(pr['recall'])} | "
                f"{_f(pr['f1'])} | {_f(pr['fpr'])} | {_f(pr['tpr_at_1pct_fpr'])} | {_f(ctd.get('accuracy'))} | "
                f"{_f(ctd.get('f1'))} | {_f(unc['f1'])} | {_f(ctd.get('delegated'))} |")
        m = result["mean"]
        lines += ["", f"Means over the {m['groups_both_classes']} held-out groups with both classes:", "",
                  ("| scorer | AUROC | accuracy | majority | F1 | FPR | TPR@1%FPR | acc > majority | "
                  "recall (harmful-only groups) | FPR (benign-only groups) |"), "|---|---|---|---|---|---|---|---|---|---|"]
        for who in ("probe", "expert"):
            s = m[who]
            lines.append(f"| {who} only | {_f(s['auroc'])} | {_f(s['accuracy'])} | {_f(s['majority_rate'])} | "
                         f"{_f(s['f1'])} | {_f(s['fpr'])} | {_f(s['tpr_at_1pct_fpr'])} | {s['above_majority']}/"
                         f"{m['groups_both_classes']} | {_f(s['recall_harmful_only'])} | {_f(s['fpr_benign_only'])} |")
        for policy, rows in m["cascade"].items():
            for r in rows:
                lines.append(f"| {policy} α={r['alpha']} (delegated {_f(r['delegated'])}) | {_f(r['auroc'])} | "
                             f"{_f(r['accuracy'])} | – | {_f(r['f1'])} | {_f(r['fpr'])} | – | {r['above_majority']}/"
                             f"{m['groups_both_classes']} | {_f(r['recall_harmful_only'])} | "
                             f"{_f(r['fpr_benign_only'])} |")
        lines.append("")
        if "adapted" in m:
            lines += _adapted_lines(result["groups"], m["adapted"])
    if "sweep" in report:
        lines += [f"## Probe features under leave-source-out (recipe `{report['sweep']['recipe']}`, probe only)", "",
                  "| (layer, pooling) | mean AUROC | mean F1 | mean accuracy | FPR | TPR@1%FPR | acc > majority |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(report["sweep"]["rows"], key=lambda r: -r["auroc"]):
            lines.append(f"| {' + '.join(f'L{v[0]} {v[1]}' for v in r['variants'])} | {_f(r['auroc'])} | "
                         f"{_f(r['f1'])} | {_f(r['accuracy'])} | {_f(r['fpr'])} | {_f(r['tpr_at_1pct_fpr'])} | "
                         f"{r['above_majority']} |")
    if "dilution" in report:
        from probes.evaluation.dilution import report_lines

        lines += report_lines(report["dilution"])
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
