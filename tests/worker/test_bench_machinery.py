"""``bench machinery`` on the small MiniLM bundle through the suite's real broker: it runs, its figures add up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctd_monitor.bench.machinery import STAGES, NullExtractor, bench_machinery
from ctd_monitor.local.broker import LocalBroker
from probes.activations.features import collate
from probes.conversation import Conversation, single_turn
from probes.runtime.monitor import Monitor
from tests.worker.helpers import worker_settings
from worker.config import TopicsConfig

STAGE_KEYS = {"decode", "render_tokenize", "batch_collate", "heads_budget", "serialise_publish", "commit",
              "unattributed"}


def test_null_extractor_keeps_tokenizer_and_width(monitor: Monitor) -> None:
    null = NullExtractor(monitor.extractor)
    ids = null.tokenize([monitor_conversation()])
    assert ids == monitor.extractor.tokenize([monitor_conversation()])
    states = null.pooled_batch(collate(ids * 3, [0, 1, 2], null.pad_id), "mean")
    assert states.shape == (3, monitor.loaded.hidden_size) and states.dtype == np.float32
    # Rows keep coming from the pool, so consecutive batches are not all the same event.
    assert not np.array_equal(states, null.pooled_batch(collate(ids * 3, [0, 1, 2], null.pad_id), "mean"))


def monitor_conversation() -> Conversation:
    return single_turn("How do I bake bread?")


def test_machinery_runs_through_the_real_broker(
    kafka_broker: LocalBroker, small_bundle: Path, cache_dir: Path, datasets_dir: Path
) -> None:
    s = worker_settings(kafka_broker.bootstrap, small_bundle, cache_dir, topics=TopicsConfig(), group="machinery")
    out = bench_machinery(s, [datasets_dir / "xstest.jsonl"], 300, partitions=(1, 2), broker=kafka_broker)
    assert out["n"] == 300 and set(out["partitions"]) == {"1", "2"}
    for run in out["partitions"].values():
        assert run["verdicts"] == 300 and run["worker_exit_code"] == 0
        assert 300 / s.batching.max_items <= run["batches"] <= 300  # at most max_items events a batch, at least one
        assert run["events_per_s"] == pytest.approx(300 / run["worker_seconds"], rel=1e-2)  # both rounded
        assert set(run["stages"]) == STAGE_KEYS and set(run["stage_cpu_seconds"]) == set(STAGES)
        # Every stage the worker timed ran, and the timed stages never exceed the process's CPU time.
        assert all(run["stage_cpu_seconds"][k] > 0 for k in ("decode", "render_tokenize", "serialise_publish"))
        timed = sum(v["cpu_seconds"] for k, v in run["stages"].items() if k != "unattributed")
        assert timed <= run["cpu_seconds"] + 0.01
        assert 0 < run["delegated"] < 300  # the bundle's threshold delegates some of the null states


def test_machinery_runs_several_worker_processes_in_one_group(
    kafka_broker: LocalBroker, small_bundle: Path, cache_dir: Path, datasets_dir: Path
) -> None:
    """``--processes 2``: two workers share one group, each holding its own partitions; their CPU time and stage
    counters add up, and every event gets one verdict."""
    s = worker_settings(kafka_broker.bootstrap, small_bundle, cache_dir, topics=TopicsConfig(), group="machinery-2")
    out = bench_machinery(s, [datasets_dir / "xstest.jsonl"], 300, partitions=(1,), broker=kafka_broker,
                          processes=(2,))
    assert out["mode"] == "processes (live feed)" and set(out["partitions"]) == {"p2-c1"}
    run = out["partitions"]["p2-c1"]
    assert run["verdicts"] == 300 and run["processes"] == 2 and run["worker_exit_codes"] == [0, 0]
    assert 300 / s.batching.max_items <= run["batches"] <= 300
    assert run["producer_events_per_s"] > 0
    timed = sum(v["cpu_seconds"] for k, v in run["stages"].items() if k != "unattributed")
    assert 0 < timed <= run["cpu_seconds"] + 0.02
