"""Fit the token-level probe and calibrate its stop thresholds; the result goes into an existing bundle.

Offline only (sklearn). Data: the response datasets (the assistant turn is the streamed response, the turns
before it the context); the label is ``response_label`` (is the response harmful), broadcast to every token of
the response, with the first ``warmup_tokens`` tokens down-weighted because they cannot show yet what the
response will become. Each training response carries the same total weight however long it is, and each class
the same total weight. Stop thresholds: Learn-then-Test (budget variant) on each benign calibration response's
peak smoothed score, so benign responses are stopped at a certified rate ≤ ``alpha``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression

from probes.calibration.ltt import (
    delegation_rates,
    fixed_sequence_test,
    split_opt_ht,
    threshold_grid,
)
from probes.config import Settings
from probes.data import SPLITS, Dataset, Record, Splits, load_dataset, split_dataset
from probes.errors import DataError
from probes.fitting.heads import fit_logistic, standardisation
from probes.fitting.pipeline import ProgressFactory, no_progress
from probes.heads.inference import LinearHead
from probes.heads.token_probe import AGGREGATORS, TOKEN_HEAD, smoothed
from probes.logs import get_logger
from probes.metrics import classification_metrics
from probes.runtime.bundle import save_bundle
from probes.runtime.manifest import HeadInfo, StopCalibration, StreamManifest
from probes.runtime.monitor import Monitor
from probes.runtime.response_text import prefix_ids, response_ids
from probes.runtime.stream_scorer import (
    ResponseFeatures,
    default_stride,
    require_causal,
    response_features,
    rolling_logits,
)

log = get_logger(__name__)
F64 = npt.NDArray[np.float64]
CONV_HEAD = "stream_conv"


def response_label(record: Record) -> int:
    """Is the response harmful: ``response_label`` where the dataset has it, else the conversation label."""
    return int(record.extras.get("response_label", record.label))


def is_response(record: Record) -> bool:
    return len(record.messages) >= 1 and record.messages[-1].role == "assistant" and bool(record.messages[-1].content)


def load_responses(settings: Settings, files: Sequence[str | Path] | None = None,
                   max_per_source: int | None = -1) -> tuple[Dataset, Splits]:
    """The response datasets as a seeded, split dataset (no balancing: label 0 is the response's own)."""
    cap = settings.stream.max_per_source if max_per_source == -1 else max_per_source
    cfg = settings.data.model_copy(update={"files": tuple(str(f) for f in files or settings.stream.files),
                                           "max_per_source": cap, "balance_with": None,
                                           # a response's class is response_label, not the record label
                                           "class_balance_per_source": False,
                                           "sources": (), "categories": ()})
    dataset = load_dataset(cfg)
    kept = tuple(r for r in dataset.records if is_response(r))
    if not kept:
        raise DataError("no record ends with an assistant turn: these are not response datasets")
    dataset = Dataset(records=kept, file_hashes=dataset.file_hashes)
    return dataset, split_dataset(dataset, cfg.splits)


def response_sequences(monitor: Monitor, records: Sequence[Record],
                       max_response_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prefix ids, response ids) of each record: the exact token sequence the stream scorer reads."""
    tok = monitor.loaded.tokenizer
    return [(prefix_ids(tok, r.messages[:-1], monitor.max_tokens),
             response_ids(tok, r.messages[-1].content)[:max_response_tokens]) for r in records]


def read_responses(monitor: Monitor, records: Sequence[Record], max_response_tokens: int,
                   progress: ProgressFactory = no_progress, what: str = "responses") -> list[ResponseFeatures]:
    require_causal(monitor.loaded)
    sequences = response_sequences(monitor, records, max_response_tokens)
    keep = [i for i, (_, r) in enumerate(sequences) if r]
    out: list[ResponseFeatures | None] = [None] * len(records)
    advance = progress(f"token states ({what})", len(keep))
    for index, features in response_features(monitor.extractor, [sequences[i] for i in keep],
                                              ("mean", monitor.pooling), advance):
        out[keep[index]] = features
    if len(keep) != len(records):
        raise DataError(f"{len(records) - len(keep)} responses have no tokens")
    return [f for f in out if f is not None]


def token_weights(n: int, warmup: int) -> F64:
    """Linear ramp (t+1)/warmup up to 1: the first tokens say little about the whole response."""
    return np.minimum(1.0, (np.arange(n) + 1.0) / warmup)


@dataclass(frozen=True)
class TokenTrainingSet:
    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    weight: F64
    responses: int


def token_training_set(states: Sequence[npt.NDArray[np.floating[Any]]], labels: Sequence[int], *,
                       per_response: int, warmup: int, seed: int) -> TokenTrainingSet:
    """Up to ``per_response`` tokens of each response (seeded), weighted as the module docstring says."""
    rng = np.random.default_rng(seed)
    y_resp = np.asarray(labels, dtype=np.int64)
    class_weight = {c: len(y_resp) / (2.0 * max(1, int((y_resp == c).sum()))) for c in (0, 1)}
    xs, ys, ws = [], [], []
    for response, label in zip(states, y_resp.tolist(), strict=True):
        n = response.shape[0]
        take = np.arange(n) if n <= per_response else np.sort(rng.choice(n, per_response, replace=False))
        ramp = token_weights(n, warmup)[take]
        xs.append(np.asarray(response[take], dtype=np.float32))
        ys.append(np.full(take.size, label, dtype=np.int64))
        ws.append(class_weight[label] * ramp / ramp.sum())
    weight = np.concatenate(ws)
    return TokenTrainingSet(x=np.concatenate(xs), y=np.concatenate(ys), weight=weight / weight.mean(),
                            responses=len(states))


def fit_token_head(data: TokenTrainingSet, *, c: float, seed: int, max_iter: int = 2000) -> LinearHead:
    if len(np.unique(data.y)) < 2:
        raise DataError("the token probe needs harmful and benign responses in its training split")
    mean, scale = standardisation(data.x)
    model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    model.fit((data.x - mean) / scale, data.y, sample_weight=data.weight)
    return LinearHead(mean=mean, scale=scale, weight=model.coef_[0].astype(np.float32),
                      bias=float(model.intercept_[0]))


def calibrate_stop(peaks: npt.ArrayLike, *, alpha: float, delta: float, seed: int, name: str,
                   grid_size: int = 200, opt_fraction: float = 0.3, extension: int = 40) -> StopCalibration:
    """LTT (budget variant) of a stop threshold on benign scores, with the calibration module's test.

    ``calibrate`` starts its grid just above the opt split's maximum; with a heavy upper tail (peaks of noisy
    per-token logits) a few HT scores lie above it, the first test fails and nothing is certified. The grid is
    therefore extended above that maximum in steps of the opt scores' spread: still fixed before the HT split
    is read, so fixed-sequence testing stays valid.
    """
    values = np.asarray(peaks, dtype=np.float64)
    opt_idx, ht_idx = split_opt_ht(values.size, seed, opt_fraction)
    opt, ht = values[opt_idx], values[ht_idx]
    base = threshold_grid(opt if opt.size else values, grid_size)
    spread = float(np.std(opt)) if opt.size > 1 else 1.0
    above = float(base[0]) + spread * np.arange(1, extension + 1) / 4.0
    grid = np.unique(np.concatenate([base, above]))[::-1]
    rates = delegation_rates(ht, grid)
    certified = fixed_sequence_test(rates, ht.size, alpha, delta)
    threshold = float(grid[certified - 1]) if certified else None
    return StopCalibration(
        signal=name, variant="budget", alpha=alpha, delta=delta, threshold=threshold, n_cal=int(values.size),
        n_opt=int(opt.size), n_ht=int(ht.size), seed=seed, certified=certified, tested=int(grid.size),
        ht_rate=float(rates[certified - 1]) if certified else None, grid_size=int(grid.size),
    )


def train_token_probe(settings: Settings, bundle_dir: Path, progress: ProgressFactory = no_progress,
                      files: Sequence[str | Path] | None = None) -> dict[str, Any]:
    """Token head + a response-level conversation head on the same data, stop thresholds, saved into the bundle."""
    cfg = settings.stream
    monitor = Monitor(bundle_dir, settings.model, cache_dir=settings.cache_dir)
    dataset, splits = load_responses(settings, files)
    seed = settings.data.splits.seed
    train = list(splits.probe_train)
    y_train = [response_label(r) for r in train]
    feats = read_responses(monitor, train, cfg.max_response_tokens, progress, "probe-train")
    tokens = token_training_set([f.token_states for f in feats], y_train, per_response=cfg.train_tokens_per_response,
                                warmup=cfg.warmup_tokens, seed=seed)
    head = fit_token_head(tokens, c=cfg.regularization_c, seed=seed)
    conv = fit_logistic(np.stack([f.pooled["mean"] for f in feats]), y_train, c=settings.probe.regularization_c,
                        max_iter=settings.probe.max_iter, seed=seed)
    w, c0 = head.folded()

    # dev is not needed here (there is no DV head on streams): it joins calibration, both disjoint from the rest.
    calibration_set = [r for r in (*splits.dev, *splits.calibration) if response_label(r) == 0]
    cal_feats = read_responses(monitor, calibration_set, cfg.max_response_tokens, progress, "calibration")
    # The stream reads whole responses (rolling view past the window), and both later tokens and a longer read
    # raise a benign response's peak: the stop threshold is calibrated on whole reads (up to a cap), not on
    # first windows, which left the benign stop rate of long responses near 2·α (README "Scores past the window").
    stride = default_stride(cfg.max_response_tokens)
    cal_logits = rolling_logits(monitor.extractor, lambda states: (states @ w).astype(np.float64) + c0,
                                response_sequences(monitor, calibration_set, cfg.calibration_max_tokens),
                                window=cfg.max_response_tokens, stride=stride)
    cal: dict[str, StopCalibration] = {}
    for agg in AGGREGATORS:
        peaks = [float(smoothed(z, agg, decay=cfg.decay, window=cfg.window).max()) for z in cal_logits]
        cal[agg] = calibrate_stop(peaks, alpha=cfg.alpha, delta=cfg.delta, seed=seed,
                                  name=f"token_{agg}_peak")
    # The conversation-level heads read the finished text once: their threshold is on that one score.
    conv_scores = conv.logit(np.stack([f.pooled["mean"] for f in cal_feats]))
    cal[CONV_HEAD] = calibrate_stop(conv_scores, alpha=cfg.alpha, delta=cfg.delta, seed=seed,
                                    name=f"{CONV_HEAD}_logit")
    safety_scores = monitor.bundle.heads["safety"].logit(np.stack([f.pooled[monitor.pooling] for f in cal_feats]))
    cal["safety"] = calibrate_stop(safety_scores, alpha=cfg.alpha, delta=cfg.delta, seed=seed,
                                   name="safety_logit_full_text")

    bundle = monitor.bundle
    train_token_p = head.proba(tokens.x)
    bundle.heads[TOKEN_HEAD] = head
    bundle.heads[CONV_HEAD] = conv
    heads = {
        **bundle.manifest.heads,
        TOKEN_HEAD: HeadInfo(type="logistic", output="token logit", target="response_label",
                             c=cfg.regularization_c, n_train=tokens.responses,
                             trained_on=f"{tokens.y.size} response-token states of {tokens.responses} responses"),
        CONV_HEAD: HeadInfo(type="logistic", output="p_unsafe", target="response_label",
                            c=settings.probe.regularization_c, n_train=len(train),
                            trained_on="mean over context + response tokens"),
    }
    section = StreamManifest(
        layer=monitor.extractor.layer, decay=cfg.decay, window=cfg.window, aggregator=cfg.aggregator,
        score=cfg.score, max_response_tokens=cfg.max_response_tokens, prefix_max_tokens=monitor.max_tokens,
        holdback_tokens=cfg.holdback_tokens, warmup_tokens=cfg.warmup_tokens,
        train_tokens_per_response=cfg.train_tokens_per_response, max_per_source=cfg.max_per_source,
        file_sha256=dataset.file_hashes, content_hash=dataset.content_hash(), split_seed=seed,
        split_sizes={name: {"n": len(splits.get(name)),
                            "harmful_responses": int(sum(response_label(r) for r in splits.get(name)))}
                     for name in SPLITS},
        alpha=cfg.alpha, delta=cfg.delta, n_benign_calibration=len(cal_feats),
        thresholds=cal,
        train_token_metrics=classification_metrics(tokens.y, train_token_p),
        calibration_max_tokens=cfg.calibration_max_tokens, calibration_stride=stride,
    )
    bundle.manifest = bundle.manifest.replace(heads=heads, stream=section)
    save_bundle(bundle, bundle_dir)
    log.info("token_probe.trained", bundle=str(bundle_dir), n_train=len(train),
             thresholds={a: section.thresholds[a].threshold for a in AGGREGATORS})
    return {"bundle": str(bundle_dir), "split_sizes": section.split_sizes, "train_tokens": int(tokens.y.size),
            "n_benign_calibration": len(cal_feats),
            "thresholds": {k: v.model_dump(mode="json") for k, v in section.thresholds.items()}}
