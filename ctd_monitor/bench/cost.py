"""``bench cascade-cost``: compute per 1k events of expert-only versus the cascade, with the accuracy of each.

On one set of labelled conversations: the probe scores all of them (forward pass + heads), the
bundle's calibrated rule picks the delegated ones, and the expert is timed twice, on every event
(expert-only) and on the delegated ones alone (the cascade's share). Compute is also counted as
parameters x tokens, the hardware-independent figure: the probe model's parameters (the truncated
stack actually run) times its tokens, the expert's ``parameters_per_token`` times the tokens it reads.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ctd_monitor.bench.heads import token_batches
from probes.calibration.cascade_rule import Cuts, cascade_decisions, per_1k
from probes.conversation import Conversation, plain_text
from probes.data import Record, read_file
from probes.errors import BundleError, ConfigError, CtdError, DataError
from probes.experts.base import Expert
from probes.experts.factory import build_expert
from probes.logs import get_logger
from probes.runtime.manifest import DEFAULT_UNSAFE_CUT
from probes.runtime.monitor import Monitor, head_scores
from worker.config import WorkerSettings

log = get_logger(__name__)
F64 = npt.NDArray[np.float64]


def bench_records(settings: WorkerSettings, monitor: Monitor, files: Sequence[Path] | None,
                  n: int) -> tuple[list[Record], str]:
    """``files`` if given, else the bundle's own evaluation split (the distribution it was calibrated on)."""
    if files:
        return [r for path in files for r in read_file(path)][:n], ",".join(p.name for p in files)
    from probes.evaluation.cascade import settings_for_bundle
    from probes.fitting.pipeline import prepare_data

    try:
        prepared = prepare_data(settings_for_bundle(settings, monitor.bundle))
    except (DataError, KeyError) as exc:
        raise DataError(f"the bundle's data recipe is not usable here ({exc}); pass --data") from exc
    return list(prepared.splits.evaluation)[:n], "bundle evaluation split"


def _accuracy(y: npt.NDArray[np.int64], flagged: npt.NDArray[np.bool_]) -> float:
    return float(np.mean(flagged == y))


def _expert_cut(monitor: Monitor, expert: Expert) -> float:
    cut = monitor.bundle.manifest.expert_cut(expert.name)
    return cut.cut if cut is not None else DEFAULT_UNSAFE_CUT


def _expert_tokens(expert: Expert, conversations: Sequence[Conversation]) -> tuple[int, str] | None:
    tokenizer, max_length = getattr(expert, "tokenizer", None), getattr(expert, "max_length", None)
    if tokenizer is None or max_length is None:
        return None
    ids = tokenizer([plain_text(c) for c in conversations], truncation=True, max_length=int(max_length))["input_ids"]
    return sum(len(x) for x in ids), "expert tokenizer on the plain conversation (a prompt template is not counted)"


def _timed_expert(expert: Expert, conversations: list[Conversation]) -> tuple[F64, float]:
    if not conversations:
        return np.zeros(0), 0.0
    started = time.perf_counter()
    scores = np.asarray(expert.score(conversations), dtype=np.float64)
    return scores, time.perf_counter() - started


def bench_cascade_cost(settings: WorkerSettings, files: Sequence[Path] | None, n: int) -> dict[str, Any]:
    monitor = Monitor(settings.worker.bundle, settings.model, cache_dir=settings.cache_dir)
    rule = monitor.rule
    if not rule.valid:
        raise BundleError("the bundle has no calibrated threshold: run `ctd-monitor calibrate` first")
    records, source = bench_records(settings, monitor, files, n)
    if not records:
        raise DataError("no records to benchmark")
    conversations = [r.messages for r in records]
    y = np.asarray([r.label for r in records], dtype=np.int64)

    # Probe: everything the worker does per event after decoding (tokenize, forward, pool, heads).
    monitor.features(token_batches(monitor, conversations[:8], settings)[1][0])  # warm-up
    started = time.perf_counter()
    plan, batches, probe_tokens = token_batches(monitor, conversations, settings)
    p, signal = np.zeros(len(records)), np.zeros(len(records))
    order = [i for indices in plan for i in indices]
    scored = [head_scores(monitor.bundle, monitor.features(batch), rule.signal) for batch in batches]
    probe_seconds = time.perf_counter() - started
    p[order] = np.concatenate([s.p_unsafe for s in scored])
    signal[order] = np.concatenate([s.signal for s in scored])
    delegated = rule.decide(signal)
    # All parameters of the stack that runs, embeddings included: the experts count theirs the same way.
    probe_params = sum(int(x.numel()) for x in monitor.loaded.model.parameters())
    probe = {
        "seconds_per_1k": per_1k(probe_seconds, len(records)),
        "params_x_tokens_per_1k": per_1k(float(probe_params) * probe_tokens, len(records)),
        "params_per_token": probe_params, "tokens": probe_tokens, "accuracy": _accuracy(y, p >= monitor.unsafe_cut),
        "model": monitor.model_version, "layers_run": monitor.loaded.max_layer,
    }
    out: dict[str, Any] = {
        "n": len(records), "data": source, "positives": int(y.sum()), "bundle": monitor.bundle.version,
        "signal": rule.signal, "alpha": rule.alpha, "threshold": rule.threshold, "variant": rule.variant,
        "delegated": int(delegated.sum()), "realized_delegation_rate": float(delegated.mean()),
        "probe_only": probe,
    }
    try:
        expert = build_expert(settings, bundle_manifest=monitor.bundle.manifest)
    except (ConfigError, CtdError, OSError) as exc:
        reason = (f"no expert: {exc}. Pass --expert-path (encoder-head) or --expert-backend, or use a bundle "
                  "trained with `ctd-monitor train`; expert-only and cascade figures are skipped")
        log.warning("bench.no_expert", error=str(exc))
        return {**out, "expert_only": None, "cascade": None, "skipped": reason}

    _timed_expert(expert, conversations[:4])  # warm-up
    b, expert_seconds = _timed_expert(expert, conversations)
    chosen = [conversations[i] for i in np.flatnonzero(delegated)]
    _, cascade_expert_seconds = _timed_expert(expert, chosen)
    counted = _expert_tokens(expert, conversations)
    chosen_counted = _expert_tokens(expert, chosen)
    if counted is None or chosen_counted is None:
        # No tokenizer to ask: the probe's token counts stand in for the expert's.
        lengths = np.asarray([len(monitor.tokenize(c)) for c in conversations])
        expert_tokens, chosen_tokens = int(lengths.sum()), int(lengths[delegated].sum())
        token_note = "estimated with the probe's tokenizer (the expert exposes none)"
    else:
        (expert_tokens, token_note), (chosen_tokens, _) = counted, chosen_counted
    ppt = expert.parameters_per_token()
    cuts = Cuts(probe=monitor.unsafe_cut, expert=_expert_cut(monitor, expert))
    expert_accuracy = _accuracy(y, b >= cuts.expert)
    cascade_accuracy = _accuracy(y, cascade_decisions(delegated, p, b, cuts))
    expert_only = {
        "seconds_per_1k": per_1k(expert_seconds, len(records)),
        "params_x_tokens_per_1k": per_1k(float(ppt) * expert_tokens, len(records)),
        "params_per_token": ppt, "tokens": expert_tokens, "accuracy": expert_accuracy, "expert": expert.name,
    }
    cascade_seconds = probe_seconds + cascade_expert_seconds
    cascade_compute = float(probe_params) * probe_tokens + float(ppt) * chosen_tokens
    cascade = {
        "seconds_per_1k": per_1k(cascade_seconds, len(records)),
        "params_x_tokens_per_1k": per_1k(cascade_compute, len(records)),
        "expert_calls_per_1k": per_1k(float(delegated.sum()), len(records)),
        "expert_seconds_per_1k": per_1k(cascade_expert_seconds, len(records)),
        "accuracy": cascade_accuracy,
    }
    return {
        **out, "expert_only": expert_only, "cascade": cascade, "expert_tokens": token_note,
        "cascade_vs_expert": {
            "seconds_ratio": cascade_seconds / expert_seconds if expert_seconds else None,
            "compute_ratio": cascade_compute / (float(ppt) * expert_tokens) if ppt and expert_tokens else None,
            "accuracy_delta": cascade_accuracy - expert_accuracy,
        },
    }

