"""The guard cancels (issue 22 item 7): a timed-out expert call cannot block the next, a model failing every
input opens a circuit breaker (liveness red, no storm), retries before giving up, alert dedupe by severity.

Unit tests first (no broker), then the guard and the worker against the real broker with the real small expert.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from probes.conversation import Conversation
from probes.errors import ExpertError
from probes.experts.encoder_head import EncoderHeadExpert
from probes.runtime.monitor import Monitor
from tests.worker.helpers import (
    WrappedExpert,
    distinct,
    guard_settings,
    new_topics,
    produce_raw,
    read_topic,
    review_requests,
    start_guard,
    wait_for,
    worker_settings,
)
from tests.worker.test_alerts import verdict
from worker.alerts import AlertPolicy
from worker.breaker import CircuitBreaker
from worker.config import AlertsConfig
from worker.lanes import Lanes, LanesExhausted
from worker.monitor import monitor_stream


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_n_give_ups_in_a_row_pauses_doubling_and_one_success_closes_it() -> None:
    clock = Clock()
    states: list[bool] = []
    breaker = CircuitBreaker(3, 10.0, max_cooldown_s=25.0, clock=clock, on_change=states.append)
    assert not breaker.failure() and not breaker.failure()
    breaker.success()  # a scored batch between: the count starts again
    assert not breaker.failure() and not breaker.failure() and breaker.why() is None
    assert breaker.failure() and breaker.opened and breaker.pause_s() == 10.0
    assert breaker.why() is not None and "breaker open" in breaker.why()  # type: ignore[operator]
    clock.now = 10.0
    assert breaker.pause_s() == 0.0 and breaker.opened  # half-open: tried again, liveness still red
    assert not breaker.failure() and not breaker.failure() and breaker.failure()  # re-opened, cooldown doubled
    assert breaker.pause_s() == 20.0
    clock.now = 30.0
    for _ in range(3):
        breaker.failure()
    assert breaker.pause_s() == 25.0  # capped
    breaker.success()
    assert not breaker.opened and breaker.pause_s() == 0.0 and breaker.why() is None
    assert states == [True, False] and breaker.episodes == 1


async def test_a_timed_out_call_is_left_behind_and_the_next_runs_at_once() -> None:
    lanes = Lanes("test", max_abandoned=2)
    release = threading.Event()
    try:
        with pytest.raises(TimeoutError):
            await lanes.call(0.2, release.wait, 30)
        started = time.monotonic()
        assert await lanes.call(5, lambda x: x * 2, 21) == 42  # not queued behind the stuck call
        assert time.monotonic() - started < 1.0
        assert lanes.abandoned_running() == 1 and lanes.stuck() is None
        with pytest.raises(TimeoutError):
            await lanes.call(0.2, release.wait, 30)
        assert lanes.stuck() is not None  # two wedged calls: refuse more, liveness red
        with pytest.raises(LanesExhausted):
            await lanes.call(5, lambda: 1)
        release.set()  # the stuck calls return: their threads end and calls are taken again
        await wait_for(lambda: lanes.abandoned_running() == 0, 5)
        assert lanes.stuck() is None and await lanes.call(5, lambda: 7) == 7
        with pytest.raises(ValueError):  # an error in the call reaches the caller
            await lanes.call(5, int, "x")
    finally:
        release.set()
        lanes.close()


def test_a_higher_severity_gets_through_the_dedupe_window_a_lower_one_does_not() -> None:
    policy = AlertPolicy(AlertsConfig(dedupe_window_s=600))
    warning, _ = policy.consider(verdict(event="p", source="probe", delegated=False, p=0.95), 0.0)
    assert warning is not None and warning.severity == "warning"
    critical, why = policy.consider(verdict(event="x", p=0.95), 10.0)  # the expert: critical
    assert why is None and critical is not None and critical.severity == "critical"
    assert policy.consider(verdict(event="y", p=0.97), 20.0) == (None, "duplicate_conversation")
    assert policy.consider(verdict(event="z", source="probe", delegated=False, p=0.9), 30.0) == (
        None, "duplicate_conversation")


class StuckExpert(WrappedExpert):
    """The real expert, except that a batch holding "STUCK" never returns until the test releases it (a wedged
    device); or, with ``fail_all``, a device failing every call."""

    def __init__(self, inner: EncoderHeadExpert, *, fail_all: bool = False) -> None:
        super().__init__(inner)
        self.release = threading.Event()
        self.fail_all = fail_all

    def before_score(self, conversations: Sequence[Conversation]) -> None:
        if self.fail_all:
            raise ExpertError("CUDA error: an illegal memory access was encountered (simulated)")
        if any("STUCK" in c[0].content for c in conversations):
            self.release.wait(120)


def _stuck_request(template: bytes) -> tuple[bytes, bytes]:
    body = orjson.loads(template)
    body["event"]["event_id"] = "stuck"
    body["event"]["conversation_id"] = "conv-stuck"
    body["event"]["messages"] = [{"role": "user", "content": "STUCK how do I bake bread?"}]
    return b"conv-stuck", orjson.dumps(body)


@pytest.mark.kafka
async def test_a_stuck_expert_call_does_not_block_later_batches(
    kafka_broker: Any, cache_dir: Path, datasets_dir: Path, small_expert: EncoderHeadExpert
) -> None:
    topics = new_topics(kafka_broker.create_topics)
    gs = guard_settings(kafka_broker.bootstrap, topics, cache_dir, expert_timeout_s=1.0, max_expert_attempts=2,
                        max_batch=8, alerts=AlertsConfig(enabled=False))
    expert = StuckExpert(small_expert)
    guard, task = await start_guard(gs, expert)
    requests = review_requests(datasets_dir, 24)
    try:
        await produce_raw(kafka_broker.bootstrap, topics.review, [_stuck_request(requests[0][1]), *requests[:8]],
                          sign="review_request")
        await asyncio.sleep(1.5)  # the first batch is stuck past its timeout
        await produce_raw(kafka_broker.bootstrap, topics.review, requests[8:], sign="review_request")
        started = time.monotonic()
        verdicts = await read_topic(kafka_broker.bootstrap, topics.verdicts, until=lambda r: len(distinct(r)) >= 25,
                                    timeout=60)
        elapsed = time.monotonic() - started
        by_id = {v["event_id"]: v for v in verdicts}
        # every other request, in the stuck batch or after it, gets the expert's own verdict
        others = {orjson.loads(r)["event"]["event_id"] for _, r in requests}
        assert {by_id[i]["source"] for i in others} == {"expert"}
        # the stuck one alone is given up, fail closed
        assert (by_id["stuck"]["source"], by_id["stuck"]["decision"]) == ("expert_unavailable", "unsafe")
        assert elapsed < 30, elapsed
        metrics = guard.guard_metrics
        assert metrics.expert_errors.labels(kind="timeout")._value.get() >= 2
        assert metrics.abandoned_calls._value.get() >= 1  # left running, out of the way
        assert guard.guard.handler.lanes.abandoned_total >= 2
    finally:
        expert.release.set()
        guard.stop()
        await asyncio.wait_for(task, 30)


@pytest.mark.kafka
async def test_an_expert_failing_every_request_opens_the_breaker_instead_of_a_storm(
    kafka_broker: Any, cache_dir: Path, datasets_dir: Path, small_expert: EncoderHeadExpert
) -> None:
    topics = new_topics(kafka_broker.create_topics)
    gs = guard_settings(kafka_broker.bootstrap, topics, cache_dir, max_batch=8, breaker_failures=3,
                        breaker_cooldown_s=600, inference_retries=1, alerts=AlertsConfig(enabled=False))
    expert = StuckExpert(small_expert, fail_all=True)
    guard, task = await start_guard(gs, expert)
    requests = review_requests(datasets_dir, 20)
    try:
        await produce_raw(kafka_broker.bootstrap, topics.review, requests, sign="review_request")
        metrics = guard.guard_metrics
        await wait_for(lambda: metrics.circuit_open._value.get() == 1, 60)
        await asyncio.sleep(1.0)
        verdicts = await read_topic(kafka_broker.bootstrap, topics.verdicts, until=lambda r: len(r) >= 3, timeout=10)
        await asyncio.sleep(1.0)
        verdicts = await read_topic(kafka_broker.bootstrap, topics.verdicts, until=lambda r: False, timeout=1.0)
        # three given up (each retried once first), then the storm stops: the rest wait in the topic
        assert len(verdicts) == 3 and {v["source"] for v in verdicts} == {"expert_unavailable"}
        assert metrics.expert_errors.labels(kind="given_up")._value.get() == 3
        assert guard.guard.tracker.in_flight() == 17
        live, why = guard.live()
        assert not live and "breaker open" in why
        # the model recovers (in production: the restart liveness asks for); the cooldown ends, all get verdicts
        expert.fail_all = False
        guard.guard.handler.breaker._until = 0.0
        verdicts = await read_topic(kafka_broker.bootstrap, topics.verdicts, until=lambda r: len(distinct(r)) >= 20,
                                    timeout=60)
        assert sum(v["source"] == "expert" for v in verdicts) == 17
        await wait_for(lambda: metrics.circuit_open._value.get() == 0, 10)
        assert guard.live()[0]
    finally:
        guard.stop()
        await asyncio.wait_for(task, 30)


@pytest.mark.kafka
async def test_a_model_failing_every_event_opens_the_worker_breaker_and_a_transient_failure_is_retried(
    kafka_broker: Any, small_bundle: Path, cache_dir: Path, monitor: Monitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = new_topics(kafka_broker.create_topics, 1)
    s = worker_settings(kafka_broker.bootstrap, small_bundle, cache_dir, topics=topics,
                        group=f"g-{uuid.uuid4().hex[:6]}", breaker_failures=3, breaker_cooldown_s=600,
                        inference_retries=1, inference_retry_backoff_s=0.05)
    original = monitor.score
    state = {"broken": True, "transient": 0}

    def broken(batch: Any, **kwargs: Any) -> Any:
        if state["broken"]:
            raise RuntimeError("CUDA error: device-side assert triggered (simulated)")
        if state["transient"]:
            state["transient"] -= 1
            raise RuntimeError("transient (simulated)")
        return original(batch, **kwargs)

    monkeypatch.setattr(monitor, "score", broken)
    worker = monitor_stream(s, monitor)
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: worker.ready() or task.done(), timeout=60)
    try:
        values = [(b"k", orjson.dumps({"event_id": f"e-{i}", "conversation_id": f"c{i}",
                                       "created_at": "2026-01-01T00:00:00Z",
                                       "messages": [{"role": "user", "content": f"how do I bake bread {i}"}]}))
                  for i in range(20)]
        await produce_raw(s.kafka.bootstrap_servers, s.topics.input, values)
        await wait_for(lambda: worker.metrics.circuit_open._value.get() == 1, 60)
        await asyncio.sleep(1.0)
        dead = await read_topic(s.kafka.bootstrap_servers, s.topics.dead_letter, until=lambda r: False, timeout=1.0)
        assert len(dead) == 3 and {d["reason"] for d in dead} == {"inference_error"}
        live, why = worker.live()
        assert not live and "breaker open" in why
        state["broken"], state["transient"] = False, 1  # recovers; one more failure on the next call, retried
        worker.handler.breaker._until = 0.0
        verdicts = await read_topic(s.kafka.bootstrap_servers, s.topics.verdicts,
                                    until=lambda r: len(distinct(r)) >= 17, timeout=60)
        assert len(distinct(verdicts)) == 17
        assert worker.live()[0] and worker.metrics.circuit_open._value.get() == 0
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
