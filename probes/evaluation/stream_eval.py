"""Evaluate the streamed stop rule on response datasets: EMA vs rolling-max vs the conversation-level probes.

Per response: the token probe's logits over the response (one offline pass over the same token sequence the
stream scorer reads, so the stop index equals the streamed one), smoothed; its final and peak values; where it
first crosses the calibrated threshold. The conversation-level probes score the finished text once (they
cannot stop early: "share seen" is 1). Labels are ``response_label``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from probes.config import Settings
from probes.data import Record
from probes.fitting.pipeline import ProgressFactory, no_progress
from probes.fitting.token_train import CONV_HEAD, load_responses, read_responses, response_label
from probes.heads.inference import sigmoid
from probes.heads.token_probe import AGGREGATORS, TokenProbe, first_crossing, stream_section
from probes.metrics import classification_metrics
from probes.runtime.manifest import StopCalibration, StreamManifest
from probes.runtime.monitor import Monitor

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ScoredResponses:
    records: list[Record]
    y: npt.NDArray[np.int64]
    token_logits: list[F64]
    conv_logit: F64
    safety_logit: F64


def score_responses(monitor: Monitor, probe: TokenProbe, records: Sequence[Record],
                    progress: ProgressFactory = no_progress) -> ScoredResponses:
    feats = read_responses(monitor, records, probe.settings.max_response_tokens, progress, "evaluation")
    bundle = monitor.bundle
    return ScoredResponses(
        records=list(records), y=np.asarray([response_label(r) for r in records], dtype=np.int64),
        token_logits=[probe.logits(f.token_states) for f in feats],
        conv_logit=bundle.heads[CONV_HEAD].logit(np.stack([f.pooled["mean"] for f in feats])),
        safety_logit=bundle.heads["safety"].logit(np.stack([f.pooled[monitor.pooling] for f in feats])),
    )


def _auroc(y: npt.NDArray[np.int64], scores: F64) -> float:
    return classification_metrics(y, sigmoid(scores))["auroc"]


def stream_row(name: str, y: npt.NDArray[np.int64], final: F64, peak: F64, stops: list[int | None],
         lengths: list[int], calibration: StopCalibration, alpha: float) -> dict[str, Any]:
    stopped = np.asarray([s is not None for s in stops])
    harmful, benign = y == 1, y == 0
    seen = [(s + 1) / n for s, n, h in zip(stops, lengths, harmful.tolist(), strict=True) if s is not None and h]
    benign_rate = float(stopped[benign].mean()) if benign.any() else float("nan")
    return {
        "method": name, "n": int(y.size), "harmful": int(harmful.sum()),
        "auroc_final": _auroc(y, final), "auroc_peak": _auroc(y, peak),
        "harmful_stopped": float(stopped[harmful].mean()) if harmful.any() else float("nan"),
        "median_share_seen_at_stop": float(np.median(seen)) if seen else float("nan"),
        "median_tokens_to_stop": float(np.median([s + 1 for s, h in zip(stops, harmful.tolist(), strict=True)
                                                  if s is not None and h])) if seen else float("nan"),
        "benign_stop_rate": benign_rate, "budget": alpha, "within_budget": bool(benign_rate <= alpha),
        "threshold": calibration.threshold, "certified": calibration.valid,
    }


def stream_report(scored: ScoredResponses, probe: TokenProbe, section: StreamManifest) -> dict[str, Any]:
    """One row per method; thresholds are the bundle's calibrated ones, applied unchanged."""
    alpha = section.alpha
    calibration = section.thresholds
    lengths = [int(z.size) for z in scored.token_logits]
    rows = []
    for agg in AGGREGATORS:
        series = [probe.series(z, agg) for z in scored.token_logits]
        tau = calibration[agg].threshold
        rows.append(stream_row(f"token {agg}", scored.y, np.asarray([s[-1] for s in series]),
                         np.asarray([s.max() for s in series]), [first_crossing(s, tau) for s in series],
                         lengths, calibration[agg], alpha))
    for key, name, values in ((CONV_HEAD, "conversation probe (response-trained, full text)", scored.conv_logit),
                              ("safety", "conversation probe (bundle safety head, full text)", scored.safety_logit)):
        tau = calibration[key].threshold
        stops = [n - 1 if tau is not None and v > tau else None for v, n in zip(values, lengths, strict=True)]
        rows.append(stream_row(name, scored.y, values, values, stops, lengths, calibration[key], alpha))
    s = probe.settings
    return {"n": int(scored.y.size), "harmful": int(scored.y.sum()), "delta": section.delta,
            "settings": {"decay": s.decay, "window": s.window, "max_response_tokens": s.max_response_tokens},
            "rows": rows}


def markdown_table(report: dict[str, Any]) -> str:
    head = ("| method | AUROC final | AUROC peak | harmful stopped | median share seen at stop | "
            "median tokens to stop | benign stop rate | budget α |\n|---|---|---|---|---|---|---|---|\n")

    def f(x: Any) -> str:
        return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"

    lines = [f"| {r['method']} | {f(r['auroc_final'])} | {f(r['auroc_peak'])} | {f(r['harmful_stopped'])} | "
             f"{f(r['median_share_seen_at_stop'])} | {f(r['median_tokens_to_stop'])} | {f(r['benign_stop_rate'])} | "
             f"{r['budget']} |" for r in report["rows"]]
    s = report["settings"]
    note = (f"\n{report['n']} responses ({report['harmful']} harmful, label = response_label); EMA λ = {s['decay']}, "
            f"rolling window {s['window']} tokens, first {s['max_response_tokens']} response tokens read; "
            f"thresholds: LTT (budget variant, δ = {report['delta']}) on benign calibration responses' peaks.\n")
    return head + "\n".join(lines) + "\n" + note


def run_evaluate_stream(settings: Settings, bundle_dir: Path, files: Sequence[Path] | None,
                        max_per_source: int | None, progress: ProgressFactory = no_progress) -> dict[str, Any]:
    """The evaluation split of the response files (split as the token probe's training was: disjoint)."""
    monitor = Monitor(bundle_dir, settings.model, cache_dir=settings.cache_dir)
    probe = TokenProbe.from_bundle(monitor.bundle)
    section = stream_section(monitor.bundle)
    splits_cfg = settings.data.splits.model_copy(update={"seed": section.split_seed})
    settings = settings.model_copy(update={"data": settings.data.model_copy(update={"splits": splits_cfg})})
    _, splits = load_responses(settings, files, max_per_source)
    scored = score_responses(monitor, probe, splits.evaluation, progress)
    report = stream_report(scored, probe, section)
    report["files"] = [str(f) for f in files] if files else list(settings.stream.files)
    report["max_per_source"] = max_per_source
    report["bundle"] = {"path": str(bundle_dir), "id": monitor.bundle.version}
    report["markdown"] = markdown_table(report)
    return report
