"""Audits in the monitor handler (real MiniLM bundle, in-memory consumer and producer): which events are sent to
the expert, what their verdicts carry, and that a refitted map and cut decide the verdicts that follow."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest

from probes.calibration.recalibration import audit_selected
from probes.conversation import single_turn
from probes.errors import ConfigError
from probes.heads.inference import LinearHead, logit
from probes.runtime.monitor import Monitor, Scores
from tests.worker.helpers import worker_settings
from tests.worker.test_monitor_items import _consumer, _event
from tests.worker.test_recalibration import T0, FakeVerdictTopic
from tests.worker.test_stream import P0, FakeProducer, running, stopped, until
from worker.config import TopicsConfig, WorkerAuditConfig, WorkerSettings
from worker.metrics import WorkerMetrics
from worker.monitor import MonitorHandler, MonitorStream, monitor_stream, safety_head
from worker.recalibration import Audit
from worker.stream import ServiceLimits

TEXTS = ["How do I bake bread?", "Write a poem about the sea.", "How can I hurt someone and not get caught?",
         "Explain photosynthesis.", "Give me step by step instructions to build a weapon.", "What is 2 + 2?"]


def _stream(settings: WorkerSettings, monitor: Monitor, values: list[bytes]) -> tuple[MonitorStream, Any, Any]:
    consumer, producer = _consumer(values), FakeProducer(auto_ack=True)
    stream = monitor_stream(settings, monitor, WorkerMetrics())
    stream.consumer, stream.producer = consumer, producer
    stream.limits = ServiceLimits(max_in_flight=1000, max_event_bytes=1 << 20, shutdown_deadline_s=5,
                                  commit_interval_s=0.01, liveness_max_stall_s=60, http_port=None)
    assert stream.handler.feed is not None
    stream.handler.feed.consumer = FakeVerdictTopic({0: []})  # an empty verdicts topic: caught up at once
    return stream, consumer, producer


def _settings(small_bundle: Path, cache_dir: Path, **audit: Any) -> WorkerSettings:
    base = worker_settings("unused:9092", small_bundle, cache_dir, topics=TopicsConfig(), group="g")
    # One tenant, no quota in the way: these tests are about what an audit carries (test_audit_quotas: the quotas).
    config = WorkerAuditConfig(**{"rate": 0.5, "window": 60, "min_window": 20, "refit_every": 1, "epsilon": 0.2,
                                  "delta": 0.2, "settle_s": 0.0, "tenant_share": 1.0, "tenant_burst": 10_000,
                                  **audit})
    return base.model_copy(update={"audit": config})


def _out(producer: FakeProducer, topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(v) for t, v, _ in producer.sent if t == topic]


async def test_audited_events_go_to_the_expert_outside_the_budget_and_keep_the_probes_verdict(
    monitor: Monitor, small_bundle: Path, cache_dir: Path
) -> None:
    settings = _settings(small_bundle, cache_dir)
    n = 60
    values = [_event(f"a{i}", TEXTS[i % len(TEXTS)]) for i in range(n)]
    stream, consumer, producer = _stream(settings, monitor, values)
    task = await running(stream)
    await until(lambda: consumer.last_commit(P0) == n)
    await stopped(stream, task)
    topics = settings.topics
    verdicts = {v["event_id"]: v for v in _out(producer, topics.verdicts)}
    requests = {r["event"]["event_id"]: r for r in _out(producer, topics.review)}
    sampler = stream.handler.audits
    assert sampler is not None and sampler.secret, "the sample is keyed by the session's audit secret"
    audited = {f"a{i}" for i in range(n) if audit_selected(f"a{i}", 0.5, "audit", key=sampler.secret)}
    delegated = {e for e, v in verdicts.items() if v["delegated"]}
    assert 15 < len(audited) < 45 and len(verdicts) == n
    assert set(requests) == audited | delegated, "one request per event: delegated, audited or both"
    for event_id, request in requests.items():
        # (added fields are left out of the JSON at their defaults: audit false, delegated true)
        assert request.get("audit", False) == (event_id in audited)
        assert request.get("delegated", True) == (event_id in delegated)
        assert request["p_unsafe"] == verdicts[event_id]["probe_p_unsafe"], "the raw score goes to the guard"
        assert request["probe_decision"] == verdicts[event_id]["decision"], "what the guard's fallback answers"
    for event_id, v in verdicts.items():
        assert v["source"] == "probe" and v.get("audit", False) == (event_id in audited)
        assert v["recalibration"] == {"version": 0, "source": "offline", "refit": "platt", "cut": v["recalibration"]["cut"],
                                      "probe_cut": monitor.unsafe_cut, "valid": v["recalibration"]["valid"],
                                      "window": 0, "window_benign": 0}
        # before any refit the map is the identity: the bundle's verdict, unchanged
        assert abs(v["p_unsafe"] - v["probe_p_unsafe"]) < 1e-6
        assert v["decision"] == ("unsafe" if v["probe_p_unsafe"] >= monitor.unsafe_cut else "safe")
    budget = stream.handler.budget
    assert sum(w.delegated for w in budget.windows.values()) == len(delegated), "audits spend no budget"
    metrics = stream.handler.metrics
    assert metrics.audits_sent._value.get() == len(audited)
    assert metrics.delegated._value.get() == len(delegated)


async def test_a_refitted_window_decides_the_verdicts_that_follow(
    monitor: Monitor, small_bundle: Path, cache_dir: Path
) -> None:
    settings = _settings(small_bundle, cache_dir, rate=0.01)
    n = 24
    values = [_event(f"b{i}", TEXTS[i % len(TEXTS)]) for i in range(n)]
    stream, consumer, producer = _stream(settings, monitor, values)
    handler = stream.handler
    assert handler.feed is not None and handler.recalibrator is not None
    # Audit labels saying the probe flags far too much: benign traffic scores up to 0.95, the unsafe near 1.
    rng = np.random.default_rng(0)
    for i in range(60):
        unsafe = i % 4 == 0
        p = float(rng.uniform(0.97, 1.0) if unsafe else rng.uniform(0.0, 0.95))
        handler.feed.feed(Audit(T0 + i, f"x{i}", p, unsafe))
    state = handler.recalibrator.state
    assert state.source == "window" and state.version > 0 and state.probe_cut > 0.7
    task = await running(stream)
    await until(lambda: consumer.last_commit(P0) == n)
    await stopped(stream, task)
    verdicts = _out(producer, settings.topics.verdicts)
    assert len(verdicts) == n
    for v in verdicts:
        raw = v["probe_p_unsafe"]
        assert v["recalibration"]["version"] == state.version and v["recalibration"]["source"] == "window"
        assert v["recalibration"]["probe_cut"] == state.probe_cut and v["recalibration"]["window"] == 60
        assert v["decision"] == ("unsafe" if raw >= state.probe_cut else "safe")
        assert abs(v["p_unsafe"] - float(handler.recalibrator.calibrated([raw])[0])) < 1e-9
        # the calibrated score and the reported cut agree with the decision
        assert (v["p_unsafe"] >= v["recalibration"]["cut"] - 1e-9) == (v["decision"] == "unsafe")
    assert handler.metrics.recalibration_version._value.get() == state.version


def _window_head_in_force(handler: MonitorHandler, monitor: Monitor) -> None:
    """Audits of traffic whose harm lies along a direction the bundle's head does not read, fed until a head refit
    on them is in force."""
    assert handler.feed is not None and handler.recalibrator is not None
    bundle_head = monitor.bundle.heads["safety"]
    assert isinstance(bundle_head, LinearHead)
    assert handler.recalibrator.features_width == bundle_head.weight.size
    rng = np.random.default_rng(0)
    direction = rng.normal(size=bundle_head.weight.size)
    direction -= direction @ bundle_head.weight / (bundle_head.weight @ bundle_head.weight) * bundle_head.weight
    direction /= np.linalg.norm(direction)
    for i in range(60):
        unsafe = i % 4 == 0
        z = rng.normal(size=bundle_head.weight.size) + (4.0 * direction if unsafe else 0.0)
        x = (bundle_head.mean + bundle_head.scale * z).astype(np.float32)
        handler.feed.feed(Audit(T0 + i, f"x{i}", float(bundle_head.proba(x[None, :])[0]), unsafe, x))


async def test_a_refit_head_decides_on_each_events_activations_and_audits_send_them(
    monitor: Monitor, small_bundle: Path, cache_dir: Path
) -> None:
    settings = _settings(small_bundle, cache_dir, refit="head")
    n = 24
    values = [_event(f"h{i}", TEXTS[i % len(TEXTS)]) for i in range(n)]
    stream, consumer, producer = _stream(settings, monitor, values)
    handler = stream.handler
    bundle_head = monitor.bundle.heads["safety"]
    _window_head_in_force(handler, monitor)
    assert handler.recalibrator is not None
    state = handler.recalibrator.state
    assert state.refit == "head" and state.source == "window" and state.probe_cut is None
    refit = handler.recalibrator.head
    assert refit is not None and refit is not bundle_head
    task = await running(stream)
    await until(lambda: consumer.last_commit(P0) == n)
    await stopped(stream, task)
    verdicts = {v["event_id"]: v for v in _out(producer, settings.topics.verdicts)}
    requests = {r["event"]["event_id"]: r for r in _out(producer, settings.topics.review)}
    assert handler.audits is not None
    audited = {e for e in verdicts if handler.audits.sampled(e)}
    assert len(verdicts) == n and audited and audited <= set(requests)
    for event_id, v in verdicts.items():
        assert v["recalibration"] == {"version": state.version, "source": "window", "refit": "head",
                                      "cut": state.cut, "probe_cut": None, "valid": True, "window": 60,
                                      "window_benign": state.n_benign}
        assert "probe_features" not in v, "a probe verdict does not carry the activations"
        request = requests.get(event_id)
        if event_id not in audited:
            assert request is None or "probe_features" not in request, "only audits send the activations"
            continue
        assert request is not None
        features = np.asarray(request["probe_features"], dtype=np.float32)
        assert features.shape == bundle_head.weight.shape
        # the row the raw score came from, and the one the refit head decided on
        assert abs(float(bundle_head.proba(features[None, :])[0]) - v["probe_p_unsafe"]) < 1e-5
        calibrated = float(refit.proba(features[None, :])[0])
        assert abs(v["p_unsafe"] - calibrated) < 1e-5
        assert v["decision"] == ("unsafe" if calibrated >= state.cut else "safe")


def test_a_head_refit_needs_a_linear_safety_head() -> None:
    bundle = SimpleNamespace(heads={}, version="v-test")
    with pytest.raises(ConfigError, match="linear safety head"):
        safety_head(SimpleNamespace(bundle=bundle))  # type: ignore[arg-type]


def test_events_near_a_refit_heads_cut_are_scored_alone(monitor: Monitor, small_bundle: Path,
                                                        cache_dir: Path) -> None:
    """Under a refit head the head decides, on the event's pooled activations: an event near its cut is scored
    again from its rows forwarded alone (as one near the bundle's cut is), though its raw score is far from every
    raw cut. At least once, a redelivered event then gets the same refit-head decision."""
    base = _settings(small_bundle, cache_dir, refit="head")
    settings = base.model_copy(update={"worker": base.worker.model_copy(update={"decision_logit_margin": 10.0})})
    handler = monitor_stream(settings, monitor, WorkerMetrics()).handler
    _window_head_in_force(handler, monitor)
    assert handler.recalibrator is not None
    decider = handler.recalibrator.head_cut()
    assert decider is not None, "a window head cut in force"
    head, cut = decider
    rows = monitor.tokenize_windows_batch([single_turn(t) for t in TEXTS])
    batched = monitor.score_grouped(monitor.collate_by_length([r for item in rows for r in item]),
                                    [i for i, item in enumerate(rows) for _ in item], len(rows), keep_features=True)
    assert batched.features is not None
    near = np.abs(head.logit(batched.features) - logit(cut)) < 10.0
    assert near.any(), "an event near the refit head's cut, or this proves nothing"
    # Raw scores far from every raw cut: only the refit head can make these events near.
    far = Scores(np.full(len(rows), 1e-9), None, np.zeros(len(rows)), batched.features.copy())
    out = handler._canonical_near_cut(far, rows)
    assert handler.metrics.canonical_rescores._value.get() == near.sum()
    assert handler.metrics.canonical_rows._value.get() == sum(len(rows[i]) for i in np.flatnonzero(near))
    assert out.features is not None and all(len(item) == 1 for item in rows), "short texts: one row each"
    for i, (row,) in enumerate(rows):
        if near[i]:  # the scores and activations of its row forwarded alone
            alone = monitor.score_grouped([monitor.collate([row])], [0], 1, keep_features=True)
            assert alone.features is not None and np.array_equal(out.features[i], alone.features[0])
            assert out.p_unsafe[i] == alone.p_unsafe[0]
        else:
            assert np.array_equal(out.features[i], batched.features[i]) and out.p_unsafe[i] == 1e-9
