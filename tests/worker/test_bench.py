"""The benchmarks on the small MiniLM bundle: their figures must add up, whatever the machine's speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctd_monitor.bench.cost import bench_cascade_cost
from ctd_monitor.bench.heads import bench_heads
from ctd_monitor.bench.pipeline import bench_pipeline, raw_forward_rate
from ctd_monitor.bench.soak import bench_soak
from ctd_monitor.local.broker import LocalBroker
from probes.config import EncoderHeadConfig
from probes.conversation import single_turn
from probes.data import read_file
from probes.experts.encoder_head import train_encoder_head
from probes.runtime.monitor import Monitor
from tests.conftest import share_models
from tests.worker.helpers import mixed_files, worker_settings
from worker.config import TopicsConfig, WorkerSettings


def _settings(bundle: Path, cache_dir: Path, bootstrap: str = "127.0.0.1:1") -> WorkerSettings:
    return worker_settings(bootstrap, bundle, cache_dir, topics=TopicsConfig(), group="bench")



def test_heads_overhead_is_heads_over_extraction(small_bundle: Path, cache_dir: Path, datasets_dir: Path) -> None:
    out = bench_heads(_settings(small_bundle, cache_dir), mixed_files(datasets_dir), 40, repeats=2)
    assert out["n"] == 40 and out["batches"] >= 2 and out["heads"] == ["safety"]
    assert out["extraction_seconds"] > 0 and out["heads_seconds"] > 0
    assert out["overhead_ratio"] == pytest.approx(out["heads_seconds"] / out["extraction_seconds"])
    assert out["heads_us_per_event"] == pytest.approx(1e6 * out["heads_seconds"] / 80)
    assert out["gpu"] == {"available": False, "reason": "device is cpu, not cuda"}


def test_cascade_cost_with_and_without_an_expert(
    small_bundle: Path, cache_dir: Path, datasets_dir: Path, tmp_path: Path
) -> None:
    s = _settings(small_bundle, cache_dir)
    alone = bench_cascade_cost(s, None, 60)
    assert alone["expert_only"] is None and alone["cascade"] is None and "--expert-path" in alone["skipped"]
    assert alone["data"] == "bundle evaluation split" and 0 < alone["probe_only"]["accuracy"] <= 1

    share_models(tmp_path, cache_dir, "minilm-l6")
    records = read_file(datasets_dir / "harmbench.jsonl")[:16] + read_file(datasets_dir / "alpaca_benign.jsonl")[:16]
    expert_dir = train_encoder_head(EncoderHeadConfig(backbone="minilm-l6", max_length=32, epochs=1, batch_size=8,
                                                      max_train=32, dtype="fp32"), records, cache_dir=tmp_path)
    s = s.model_copy(update={"expert": s.expert.model_copy(update={"path": expert_dir})})
    out = bench_cascade_cost(s, mixed_files(datasets_dir), 80)
    n, delegated = out["n"], out["delegated"]
    assert n == 80 and 0 < delegated < n and out["realized_delegation_rate"] == delegated / n
    probe, expert, cascade = out["probe_only"], out["expert_only"], out["cascade"]
    assert cascade["expert_calls_per_1k"] == pytest.approx(1000 * delegated / n)
    # The cascade pays the probe on every event and the expert on the delegated ones only.
    expert_share = cascade["params_x_tokens_per_1k"] - probe["params_x_tokens_per_1k"]
    assert 0 < expert_share < expert["params_x_tokens_per_1k"]
    assert cascade["seconds_per_1k"] == pytest.approx(probe["seconds_per_1k"] + cascade["expert_seconds_per_1k"])
    assert expert["params_per_token"] > 10_000_000 and expert["tokens"] > 0
    for accuracy in (probe["accuracy"], expert["accuracy"], cascade["accuracy"]):
        assert 0 <= accuracy <= 1
    assert out["cascade_vs_expert"]["accuracy_delta"] == pytest.approx(cascade["accuracy"] - expert["accuracy"])


def test_pipeline_in_a_child_process(
    kafka_broker: LocalBroker, small_bundle: Path, cache_dir: Path, datasets_dir: Path
) -> None:
    s = _settings(small_bundle, cache_dir, kafka_broker.bootstrap)
    out = bench_pipeline(s, mixed_files(datasets_dir), 60, mode="process", broker=kafka_broker)
    assert out["verdicts"] == 60 and out["mode"] == "process"
    assert out["pipeline_eps"] == pytest.approx(60 / out["worker_seconds"])
    assert out["efficiency"] == pytest.approx(out["pipeline_eps"] / out["raw_forward_eps"])
    assert out["mean_batch_size"] > 1


def test_the_raw_baseline_forwards_the_rows_the_worker_scores(
    monitor: Monitor, small_bundle: Path, cache_dir: Path
) -> None:
    """A long conversation is scored in windows by the worker: the baseline must forward those rows too."""
    conversations = [single_turn("How do I bake bread?"), single_turn("filler words here " * 200 + "the request")]
    rows = monitor.tokenize_windows_batch(conversations)
    assert len(rows[1]) > 2
    out = raw_forward_rate(monitor, conversations, _settings(small_bundle, cache_dir))
    assert out["rows"] == sum(len(r) for r in rows)
    assert out["tokens"] == sum(len(x) for r in rows for x in r)
    assert out["raw_forward_eps"] == pytest.approx(len(conversations) / out["raw_seconds"])


def test_soak_samples_rss_and_latency_per_interval(
    kafka_broker: LocalBroker, small_bundle: Path, cache_dir: Path, datasets_dir: Path
) -> None:
    s = _settings(small_bundle, cache_dir, kafka_broker.bootstrap)
    out = bench_soak(s, mixed_files(datasets_dir), 80, rate=40, interval_s=0.5, broker=kafka_broker)
    assert out["verdicts"] == 80 and out["worker_exit_code"] == 0
    intervals = out["intervals"]
    assert len(intervals) >= 3 and sum(i["verdicts"] for i in intervals) == 80
    assert all(i["rss_mb"] > 50 for i in intervals)
    busy = [i for i in intervals if i["verdicts"]]
    assert busy and all(i["e2e"]["p50_ms"] > 0 and i["e2e"]["p99_ms"] >= i["e2e"]["p50_ms"] for i in busy)
    first, last = out["rss_first_interval_mb"], out["rss_last_interval_mb"]
    assert out["rss_growth_pct"] == pytest.approx(100 * (last - first) / first)
    assert out["rss_target_met"] == (out["rss_growth_pct"] <= 5.0)
