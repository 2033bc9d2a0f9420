"""Do token scores shift when the stream reads past its window on a rolling context? (README "Streamed responses")

Trains a real token probe (SmolLM2, block ``--layer``, window ``--window``) on the stream's response datasets,
then reads held-out responses (rows of ``refusal_direction_completions`` the training and calibration sample never
drew) longer than the window three ways: the first ``window`` tokens as the probe was trained; the tokens past it
on the rolling context (``probes.runtime.stream_scorer.rolling_logits``, what the service reads); the same tokens on the
full context (prefix + the whole response in one pass, unbounded cost: the reference). Prints one JSON object:
token-logit quantiles per part and label, and per label the share of responses whose smoothed peak crosses the
calibrated stop threshold over the first window only, over the whole rolling read, and over the full context.

    PYTHONPATH=$PWD python scripts/rolling_shift.py --out /tmp/rolling-bundle --n 200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from probes.config import (
    DataConfig,
    FeatureConfig,
    ModelConfig,
    Settings,
    StreamConfig,
    default_cache_dir,
    default_datasets_dir,
)
from probes.data import read_file
from probes.fitting.pipeline import prepare_data, train_probe
from probes.fitting.token_train import load_responses, response_label, train_token_probe
from probes.heads.token_probe import TokenProbe
from probes.runtime.monitor import Monitor
from probes.runtime.response_text import prefix_ids, response_ids
from probes.runtime.stream_scorer import response_features, rolling_logits

HELD_OUT = "refusal_direction_completions.conversations.jsonl"


def quantiles(values: list[float]) -> dict[str, float]:
    x = np.asarray(values, dtype=np.float64)
    return {"n": int(x.size), "mean": float(x.mean()), "std": float(x.std()),
            **{f"p{q}": float(np.quantile(x, q / 100)) for q in (10, 50, 90, 99)}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True, help="bundle directory (trained unless it exists)")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--n", type=int, default=200, help="held-out responses per label")
    parser.add_argument("--max-tokens", type=int, default=1024, help="response tokens read at most")
    args = parser.parse_args()
    datasets = default_datasets_dir()
    settings = Settings(
        cache_dir=default_cache_dir(), model=ModelConfig(spec="smollm2-135m-instruct", dtype="fp32", max_tokens=128),
        features=FeatureConfig(layer=args.layer, pooling="mean"),
        data=DataConfig(datasets_dir=datasets, files=("harmbench.jsonl", "alpaca_benign.jsonl"), max_per_source=60),
        stream=StreamConfig(max_per_source=200, max_response_tokens=args.window),
    )
    started = time.monotonic()
    if not (args.out / "manifest.json").exists():
        train_probe(settings, args.out, prepared=prepare_data(settings))
        train_token_probe(settings, args.out)
    trained_s = time.monotonic() - started
    monitor = Monitor(args.out, settings.model, cache_dir=settings.cache_dir)
    probe = TokenProbe.from_bundle(monitor.bundle)
    tau = probe.settings.threshold
    sampled = {r.id for r in load_responses(settings)[0].records}
    tok = monitor.loaded.tokenizer
    report: dict[str, Any] = {"layer": args.layer, "window": args.window, "stride": args.stride, "threshold": tau,
                              "aggregator": probe.settings.aggregator, "alpha": probe.settings.alpha,
                              "train_s": round(trained_s, 1)}
    for label in (0, 1):
        records = [r for r in read_file(datasets / HELD_OUT) if r.id not in sampled and response_label(r) == label]
        seqs = [(prefix_ids(tok, r.messages[:-1], monitor.max_tokens),
                 response_ids(tok, r.messages[-1].content)[: args.max_tokens]) for r in records]
        seqs = [s for s in seqs if len(s[1]) > args.window + args.stride][: args.n]
        rolled = rolling_logits(monitor.extractor, probe.logits, seqs, window=args.window, stride=args.stride)
        full: list[np.ndarray] = [np.empty(0)] * len(seqs)
        for i, feats in response_features(monitor.extractor, seqs, ()):
            full[i] = probe.logits(feats.token_states)
        w = args.window
        first = [v for z in rolled for v in z[:w].tolist()]
        past_rolling = [v for z in rolled for v in z[w:].tolist()]
        past_full = [v for z in full for v in z[w:].tolist()]
        diff = [v for zr, zf in zip(rolled, full, strict=True) for v in (zr[w:] - zf[w:]).tolist()]

        def crossed(series: list[np.ndarray]) -> float:
            return float(np.mean([tau is not None and bool((probe.series(z) > tau).any()) for z in series]))

        report[f"label_{label}"] = {
            "responses": len(seqs), "tokens_mean": float(np.mean([len(s[1]) for s in seqs])),
            "logit_first_window": quantiles(first), "logit_past_window_rolling": quantiles(past_rolling),
            "logit_past_window_full_context": quantiles(past_full),
            "rolling_minus_full": quantiles(diff),
            "stop_rate_first_window": crossed([z[:w] for z in rolled]),
            "stop_rate_whole_rolling": crossed(rolled),
            "stop_rate_whole_full_context": crossed(full),
            # The smoothed peak of the tokens past the window alone (EMA restarted there): does that part alone
            # cross more or less often than the first window?
            "stop_rate_past_window_only_rolling": crossed([z[w:] for z in rolled]),
        }
    report["total_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
