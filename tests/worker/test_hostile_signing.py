"""Forged and replayed records from a plain Kafka producer against the default configuration (``pytest -m hostile``).

The services run as the test helpers build them, which is the shipped default: signing keys per role (the session's
real keys, tests/worker/conftest.py), nothing else switched on. A producer with write access to the topics (a
third-party client, or a compromised worker holding the worker key) writes:

* a verdict with ``source: "expert"`` on the verdicts topic, unsigned → no alert, a dead letter;
* the same signed with the worker key → refused (only the guard speaks for the expert), no alert;
* an old guard-signed expert verdict replayed now → refused as stale, no alert;
* a review request for a real event's id, unsigned and signed with the guard key → the guard publishes nothing
  under that id; each is dead-lettered with its reason.

A correctly signed record sent after the forged ones proves the service read past them.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from probes.experts.encoder_head import EncoderHeadExpert
from tests.worker.helpers import (
    TopicWatcher,
    guard_settings,
    produce_signed,
    review_requests,
    role_signer,
    wait_for,
)
from worker.alerts import alert_stream
from worker.config import AlertsConfig, KafkaConfig, TopicsConfig, WorkerConfig
from worker.events import BudgetState, Timings, Verdict
from worker.main import GuardProcess
from worker.metrics import AlerterMetrics
from worker.signing import HEADER
from worker.topics import create_topics, topic_specs

pytestmark = [pytest.mark.hostile, pytest.mark.kafka]


async def _topics(bootstrap: str) -> TopicsConfig:
    """Fresh topics created as ``ctd-monitor topics create`` makes them (signed topics use LogAppendTime)."""
    topics = TopicsConfig().suffixed(uuid.uuid4().hex[:8])
    await create_topics(KafkaConfig(bootstrap_servers=bootstrap), topic_specs(topics, WorkerConfig()))
    return topics


def _expert_verdict(event_id: str, conversation: str) -> tuple[bytes, bytes]:
    v = Verdict(event_id=event_id, conversation_id=conversation, tenant="t", p_unsafe=0.99, dv=None, delegated=True,
                decision="unsafe", source="expert", budget=BudgetState(), bundle_version="b", model_version="m",
                expert_version="x", timings=Timings(), decided_at=dt.datetime.now(dt.UTC))
    return conversation.encode(), v.to_json()


FORGERIES = {
    # name → (who signs it: None for nobody, when it was signed relative to now, expected refusal reason)
    "unsigned": (None, 0.0, "missing"),
    "worker_key": ("worker", 0.0, "wrong_role"),
    "replayed": ("guard", -7200.0, "stale"),
    # Kafka allows a header without a value (aiokafka reads it as None): refused, not a crash of the reader.
    "null_header": ("null", 0.0, "malformed"),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
async def test_a_forged_or_replayed_expert_verdict_raises_no_alert(kafka_broker: Any, cache_dir: Path,
                                                                    forgery: str) -> None:
    topics = await _topics(kafka_broker.bootstrap)
    settings = guard_settings(kafka_broker.bootstrap, topics, cache_dir,
                              alerts=AlertsConfig(group_id=f"alerter-{uuid.uuid4().hex[:6]}", log_sink=False))
    metrics = AlerterMetrics()
    alerter = alert_stream(settings, metrics)
    task = asyncio.create_task(alerter.run())
    alerts = await TopicWatcher(kafka_broker.bootstrap, topics.alerts).start()
    letters = await TopicWatcher(kafka_broker.bootstrap, topics.dead_letter).start()
    try:
        await wait_for(lambda: alerter.ready() or task.done(), 60)
        role, age, reason = FORGERIES[forgery]
        key, value = _expert_verdict("victim-event", "victim")
        headers: list[tuple[str, bytes | None]] = (
            [(HEADER, None)] if role == "null" else
            list(role_signer(role).headers("verdict", key, value, now=time.time() + age)) if role else [])
        sentinel_key, sentinel = _expert_verdict("sentinel-event", "sentinel")
        await produce_signed(kafka_broker.bootstrap, topics.verdicts, [
            (key, value, headers),
            (sentinel_key, sentinel, role_signer("guard").headers("verdict", sentinel_key, sentinel)),
        ])
        await alerts.wait(lambda w: "sentinel-event" in w.ids(), 60)  # the alerter read past the forgery
        await letters.wait(lambda w: len(w.records) >= 1, 30)
    finally:
        await alerts.stop()
        await letters.stop()
        alerter.stop()
        await asyncio.wait_for(task, 30)
    assert alerts.ids() == ["sentinel-event"], "no alert for the forged verdict"
    (letter,) = letters.records
    assert letter["reason"] == "bad_signature" and letter["stage"] == "decode" and reason in letter["error"]
    assert orjson.loads(base64.b64decode(letter["value_b64"]))["event_id"] == "victim-event"
    refused_role = "none" if role in (None, "null") else role
    assert metrics.signature_refusals.labels(kind="verdict", role=refused_role, reason=reason)._value.get() == 1


async def test_a_forged_review_request_makes_the_guard_publish_nothing_under_that_id(
    kafka_broker: Any, cache_dir: Path, datasets_dir: Path, small_expert: EncoderHeadExpert
) -> None:
    topics = await _topics(kafka_broker.bootstrap)
    settings = guard_settings(kafka_broker.bootstrap, topics, cache_dir, alerts=AlertsConfig(enabled=False))
    guard = GuardProcess(settings, small_expert)
    task = asyncio.create_task(guard.run())
    verdicts = await TopicWatcher(kafka_broker.bootstrap, topics.verdicts).start()
    letters = await TopicWatcher(kafka_broker.bootstrap, topics.dead_letter).start()
    (victim, honest) = review_requests(datasets_dir, 2)
    victim_id = orjson.loads(victim[1])["event"]["event_id"]
    honest_id = orjson.loads(honest[1])["event"]["event_id"]
    try:
        await wait_for(lambda: guard.ready() or task.done(), 60)
        assert not task.done()
        await produce_signed(kafka_broker.bootstrap, topics.review, [
            (*victim, []),  # a third-party producer: no signature
            (*victim, role_signer("guard").headers("review_request", *victim)),  # the guard's key: not a worker's
            (*honest, role_signer("worker").headers("review_request", *honest)),
        ])
        await verdicts.wait(lambda w: honest_id in w.ids(), 120)  # the guard read past the forgeries
        await letters.wait(lambda w: len(w.records) >= 2, 30)
        await asyncio.sleep(1.0)
    finally:
        await verdicts.stop()
        await letters.stop()
        guard.stop()
        await asyncio.wait_for(task, 30)
    assert victim_id not in verdicts.ids(), "the guard published nothing under the forged request's id"
    # Dead letters may arrive in any order across the dead-letter topic's partitions: order them by source offset.
    (missing, wrong_role) = sorted(letters.records, key=lambda d: (d["partition"], d["offset"]))
    assert [(d["reason"], d["stage"]) for d in (missing, wrong_role)] == [("bad_signature", "decode")] * 2
    assert "missing" in missing["error"] and "wrong_role" in wrong_role["error"]
    refusals = guard.guard_metrics.signature_refusals
    assert refusals.labels(kind="review_request", role="none", reason="missing")._value.get() == 1
    assert refusals.labels(kind="review_request", role="guard", reason="wrong_role")._value.get() == 1
