"""The guard teaches the probe, on the real broker: monitor worker → audit requests → guard (real small expert) →
audit verdicts → the worker's recalibration feed → recalibrated verdicts; and a replica started afterwards
rebuilds the same state from the topic's lookback."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from probes.calibration.recalibration import OnlineRecalibrator
from probes.experts.encoder_head import EncoderHeadExpert
from probes.runtime.monitor import Monitor
from tests.worker.helpers import (
    TopicWatcher,
    dataset_events,
    event_values,
    guard_settings,
    new_topics,
    produce_raw,
    wait_for,
    worker_settings,
)
from worker.audits import load_audit_secret
from worker.config import AlertsConfig, TopicsConfig, WorkerAuditConfig, WorkerSettings
from worker.main import GuardProcess
from worker.metrics import WorkerMetrics
from worker.monitor import MonitorStream, monitor_stream
from worker.recalibration import RecalibrationFeed, tenant_cap

pytestmark = pytest.mark.kafka


@dataclass
class Running:
    """A monitor worker and a guard (real small expert) on fresh topics, with a watcher on the verdicts topic."""

    settings: WorkerSettings
    metrics: WorkerMetrics
    worker: MonitorStream
    guard: GuardProcess
    tasks: tuple[asyncio.Task[None], asyncio.Task[None]]
    verdicts: TopicWatcher
    topics: TopicsConfig

    async def stop(self) -> None:
        self.worker.stop()
        self.guard.stop()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 30)


async def start_pair(kafka_broker: Any, small_bundle: Path, cache_dir: Path, monitor: Monitor,
                     small_expert: EncoderHeadExpert, audit: WorkerAuditConfig) -> Running:
    topics = new_topics(kafka_broker.create_topics)
    ws = worker_settings(kafka_broker.bootstrap, small_bundle, cache_dir, topics=topics,
                         group=f"w-{uuid.uuid4().hex[:6]}").model_copy(update={"audit": audit})
    gs = guard_settings(kafka_broker.bootstrap, topics, cache_dir, alerts=AlertsConfig(enabled=False))
    metrics = WorkerMetrics()
    worker = monitor_stream(ws, monitor, metrics)
    worker_task = asyncio.create_task(worker.run())
    guard = GuardProcess(gs, small_expert)
    guard_task = asyncio.create_task(guard.run())
    await wait_for(lambda: (worker.ready() and guard.ready()) or worker_task.done() or guard_task.done(), 60)
    assert not worker_task.done() and not guard_task.done()
    verdicts = await TopicWatcher(kafka_broker.bootstrap, topics.verdicts).start()
    return Running(ws, metrics, worker, guard, (worker_task, guard_task), verdicts, topics)


async def late_replica(running: Running, monitor: Monitor) -> OnlineRecalibrator:
    """What a replica that starts now (a restart, a scale-up) rebuilds from the lookback, group-less."""
    offline = monitor.bundle.manifest.unsafe_cut
    audit = running.settings.audit
    head = monitor.bundle.heads["safety"] if audit.refit == "head" else None
    late = RecalibrationFeed(running.settings, OnlineRecalibrator(
        audit, offline_cut=monitor.unsafe_cut, offline_valid=offline is not None and offline.valid, head=head,
        group_cap=tenant_cap(audit)), WorkerMetrics(), secret=load_audit_secret(running.settings))
    await late.start()
    try:
        assert await late.catch_up(30)
        await late.release()
    finally:
        await late.stop()
    return late.recalibrator


async def test_audit_verdicts_recalibrate_every_replica_and_the_verdicts_say_which_state_decided(
    kafka_broker, small_bundle: Path, cache_dir: Path, monitor: Monitor, datasets_dir: Path,
    small_expert: EncoderHeadExpert,
) -> None:
    # Every event audited; a small window refitted after every audit once 10 are held.
    # One tenant, quotas out of the way (test_hostile_audits: the quotas against a grinding producer).
    audit = WorkerAuditConfig(rate=1.0, window=30, min_window=10, refit_every=1, epsilon=0.2, delta=0.2,
                              settle_s=0.2, lookback_s=600, tenant_share=1.0, tenant_burst=10_000)
    running = await start_pair(kafka_broker, small_bundle, cache_dir, monitor, small_expert, audit)
    worker, metrics, verdicts, topics = running.worker, running.metrics, running.verdicts, running.topics
    files = [datasets_dir / "harmbench.jsonl", datasets_dir / "alpaca_benign.jsonl"]
    try:
        first = [e for pair in zip(dataset_events(files[:1], 20), dataset_events(files[1:], 20), strict=True)
                 for e in pair]
        await produce_raw(kafka_broker.bootstrap, topics.input, event_values(first))
        # the guard answers every audit, the worker's feed reads the answers back and refits
        await wait_for(lambda: metrics.audit_verdicts_in._value.get() == len(first), 120)
        state = worker.handler.recalibrator.state if worker.handler.recalibrator else None
        assert state is not None and state.version > 0 and state.n == audit.window
        assert metrics.recalibration_version._value.get() == state.version
        assert metrics.audits_sent._value.get() == len(first)
        second = dataset_events(files[1:], 10, run_id="second")
        await produce_raw(kafka_broker.bootstrap, topics.input, event_values(second))
        ids = {e.event_id for e in second}
        await verdicts.wait(lambda w: ids <= {r["event_id"] for r in w.records if r["source"] == "probe"}, 60)
        await verdicts.wait(lambda w: len([r for r in w.records if r["source"] == "expert"])
                            >= len(first) + len(second), 60)
    finally:
        await verdicts.stop()
    probe = {r["event_id"]: r for r in verdicts.records if r["source"] == "probe"}
    expert = {r["event_id"]: r for r in verdicts.records if r["source"] == "expert"}
    # the first wave was decided before any audit came back: the bundle's cut, version 0
    assert all(probe[e.event_id]["recalibration"]["version"] == 0 for e in first[:5])
    # the second wave by a refitted state (the first wave's, or a later one once its own audits came back), and
    # each verdict says which and was decided by it
    assert probe[second[0].event_id]["recalibration"]["version"] == state.version
    for e in second:
        v = probe[e.event_id]
        r = v["recalibration"]
        assert v["audit"] and r["version"] >= state.version and r["window"] == audit.window
        assert v["decision"] == ("unsafe" if v["probe_p_unsafe"] >= r["probe_cut"] else "safe")
    # every audit came back as a label carrying the probe's raw score; undelegated ones do not supersede
    for event_id, v in expert.items():
        assert v["audit"] and v["probe_p_unsafe"] == probe[event_id]["probe_p_unsafe"]
        assert v["delegated"] == probe[event_id]["delegated"]
    assert any(not v["delegated"] for v in expert.values())

    # A replica that starts now (a restart, a scale-up) rebuilds the same state from the lookback, group-less.
    await wait_for(lambda: metrics.audit_verdicts_in._value.get() == len(first) + len(second), 60)
    live = worker.handler.recalibrator.state if worker.handler.recalibrator else None
    late = await late_replica(running, monitor)
    assert live is not None and late.state.version == live.version and late.state == live
    await running.stop()


async def test_with_a_head_refit_the_audits_carry_the_activations_and_the_refit_head_decides(
    kafka_broker, small_bundle: Path, cache_dir: Path, monitor: Monitor, datasets_dir: Path,
    small_expert: EncoderHeadExpert,
) -> None:
    audit = WorkerAuditConfig(rate=1.0, window=30, min_window=10, refit_every=1, epsilon=0.2, delta=0.2,
                              settle_s=0.2, lookback_s=600, refit="head", tenant_share=1.0, tenant_burst=10_000)
    running = await start_pair(kafka_broker, small_bundle, cache_dir, monitor, small_expert, audit)
    metrics, verdicts, topics = running.metrics, running.verdicts, running.topics
    recal = running.worker.handler.recalibrator
    assert recal is not None and recal.features_width == monitor.bundle.heads["safety"].weight.size
    files = [datasets_dir / "harmbench.jsonl", datasets_dir / "alpaca_benign.jsonl"]
    try:
        first = [e for pair in zip(dataset_events(files[:1], 15), dataset_events(files[1:], 15), strict=True)
                 for e in pair]
        await produce_raw(kafka_broker.bootstrap, topics.input, event_values(first))
        # the guard labels every audit and sends its activations back; the feed refits the head in its thread
        # (the state in force may lag the window until the refit at its last audit is computed)
        await wait_for(lambda: metrics.audit_verdicts_in._value.get() == len(first)
                       and recal.state.n == audit.window, 120)
        state = recal.state
        assert state.refit == "head" and state.source == "window" and state.probe_cut is None
        assert metrics.audit_verdicts_skipped.labels(reason="no_features")._value.get() == 0
        second = dataset_events(files, 10, run_id="second-head")
        await produce_raw(kafka_broker.bootstrap, topics.input, event_values(second))
        ids = {e.event_id for e in second}
        await verdicts.wait(lambda w: ids <= {r["event_id"] for r in w.records if r["source"] == "probe"}, 60)
        await verdicts.wait(lambda w: len([r for r in w.records if r["source"] == "expert"])
                            >= len(first) + len(second), 60)
        await wait_for(lambda: metrics.audit_verdicts_in._value.get() == len(first) + len(second), 60)
    finally:
        await verdicts.stop()
    probe = {r["event_id"]: r for r in verdicts.records if r["source"] == "probe"}
    expert = {r["event_id"]: r for r in verdicts.records if r["source"] == "expert"}
    assert all(probe[e.event_id]["recalibration"]["refit"] == "head" for e in first)  # the mode, from the start
    for e in second:  # decided by a refit head, no cut on the bundle's score
        r = probe[e.event_id]["recalibration"]
        assert r["refit"] == "head" and r["source"] == "window" and r["probe_cut"] is None
        assert r["version"] >= state.version
    head = monitor.bundle.heads["safety"]
    for event_id, v in expert.items():  # each audit came back with the row the probe's raw score was read from
        features = np.asarray(v["probe_features"], dtype=np.float32)
        assert features.shape == head.weight.shape
        assert abs(float(head.proba(features[None, :])[0]) - probe[event_id]["probe_p_unsafe"]) < 1e-5
    # A replica started now rebuilds the same head and cut from the lookback.
    late = await late_replica(running, monitor)
    assert late.state.version == recal.state.version and late.state == recal.state
    late_head, live_head = late.head, recal.head
    assert late_head is not None and live_head is not None
    np.testing.assert_array_equal(late_head.weight, live_head.weight)
    await running.stop()
