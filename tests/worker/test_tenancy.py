"""Tenant identity from a trusted place (issue 22 item 5): the topic, an authenticated gateway header, or, only when
chosen and then loudly, the payload. Resolver and gateway HMAC alone, then the real monitor handler (MiniLM bundle)
inside the stream core with the in-memory consumer and producer of test_stream."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from aiokafka import ConsumerRecord, TopicPartition
from pydantic import SecretStr

from probes.errors import ConfigError
from probes.runtime.monitor import Monitor
from tests.worker.helpers import worker_settings
from tests.worker.test_stream import (
    EchoHandler,
    FakeConsumer,
    FakeProducer,
    make_stream,
    record,
    running,
    stopped,
    until,
)
from worker.config import BudgetConfig, TenantConfig, TopicsConfig
from worker.events import utcnow
from worker.metrics import WorkerMetrics
from worker.monitor import monitor_stream
from worker.stream import ServiceLimits
from worker.tenancy import TenantResolver, subscription_pattern, tenant_topic
from worker.tenant_auth import AUTH_HEADER, TENANT_HEADER, gateway_headers

SECRET = b"gateway-secret"


def test_the_default_source_is_the_topic_and_the_payload_never_keys_isolation() -> None:
    assert TenantConfig().source == "topic"
    resolver = TenantResolver(TenantConfig(), "conversations")
    assert resolver.resolve("conversations.acme", None, "e1", "victim").tenant == "acme"
    plain = resolver.resolve("conversations", None, "e2", "victim")
    assert (plain.tenant, plain.claimed, plain.unverified) == ("default", "victim", None)


def test_the_subscription_pattern_takes_tenant_topics_and_nothing_else() -> None:
    pattern = re.compile(subscription_pattern("conversations-x1"))
    assert pattern.match("conversations-x1") and pattern.match("conversations-x1.acme")
    assert pattern.match(tenant_topic("conversations-x1", "team_7-b.eu"))
    for other in ("conversations-x1-other", "conversations-x10", "conversations-x1..a", "verdicts",
                  "conversations-x1.", "xconversations-x1.a"):
        assert not pattern.match(other), other
    with pytest.raises(ConfigError):
        tenant_topic("conversations", "no/slashes")


def test_gateway_header_authenticates_event_tenant_and_time() -> None:
    config = TenantConfig(source="header", gateway_secret=SecretStr(SECRET.decode()), gateway_max_age_s=300)
    resolver = TenantResolver(config, "conversations")
    now = time.time()
    good = gateway_headers(SECRET, "e1", "acme", int(now))
    assert resolver.resolve("conversations", good, "e1", "whatever", now=now).tenant == "acme"

    def outcome(headers: list[tuple[str, bytes]] | None, event_id: str = "e1") -> tuple[str, str | None]:
        t = resolver.resolve("conversations", headers, event_id, "victim", now=now)
        return t.tenant, t.unverified

    assert outcome(None) == ("unverified", "missing")
    assert outcome(good, event_id="e2") == ("unverified", "mismatch"), "a header copied onto another event"
    forged = [(TENANT_HEADER, b"victim"), good[1]]
    assert outcome(forged) == ("unverified", "mismatch"), "another tenant under a real digest"
    assert outcome(gateway_headers(b"not-the-secret", "e1", "victim", int(now))) == ("unverified", "mismatch")
    assert outcome(gateway_headers(SECRET, "e1", "acme", int(now) - 3600)) == ("unverified", "stale")
    assert outcome([*good, (TENANT_HEADER, b"acme")]) == ("unverified", "malformed")
    assert outcome([good[0], (AUTH_HEADER, b"\xff garbage")]) == ("unverified", "malformed")
    assert outcome([good[0], (AUTH_HEADER, None)]) == ("unverified", "malformed")
    assert outcome([(TENANT_HEADER, None), good[1]]) == ("unverified", "malformed")
    with pytest.raises(ConfigError, match="gateway_secret"):
        TenantResolver(TenantConfig(source="header"), "conversations")


def test_the_payload_source_is_logged_as_insecure() -> None:
    resolver = TenantResolver(TenantConfig(source="payload"), "conversations")
    assert resolver.resolve("conversations", None, "e1", "victim").tenant == "victim"
    assert resolver.pattern is None
    with structlog.testing.capture_logs() as logs:
        resolver.log_source()
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["tenant.source_insecure"]


def _event(event_id: str, tenant: str, text: str) -> bytes:
    return orjson.dumps({"event_id": event_id, "conversation_id": f"c-{event_id}", "tenant": tenant,
                         "created_at": utcnow().isoformat(), "messages": [{"role": "user", "content": text}]})


def _records(tp: TopicPartition, values: list[bytes]) -> list[ConsumerRecord[bytes, bytes]]:
    return [ConsumerRecord(topic=tp.topic, partition=tp.partition, offset=i, timestamp=0, timestamp_type=0, key=None,
                           value=v, checksum=None, serialized_key_size=0, serialized_value_size=len(v), headers=())
            for i, v in enumerate(values)]


async def test_worker_keys_isolation_on_the_topic_in_fair_order_within_byte_shares(
    monitor: Monitor, small_bundle: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tenant ``big`` sends 30 large events on its topic before ``small`` sends 4 on its own, and an impostor on the
    plain topic claims to be ``small``. The small tenant's events are tokenized in the first turn (not after the
    30 large ones), ``big`` never has more than its byte share between tokenization and verdict, the impostor is
    scored under ``default`` with its claim recorded, the budget keeps one window per real tenant, and every
    event gets its verdict."""
    topics = TopicsConfig()
    share = 40_000
    settings = worker_settings("unused:9092", small_bundle, cache_dir, topics=topics, group="g",
                               max_event_bytes=1 << 20)
    settings = settings.model_copy(update={
        "tenant": TenantConfig(max_in_flight_bytes=share, fair_quantum_bytes=16_000),
        "budget": BudgetConfig(scope="tenant", max_scopes=10)})
    big, small, plain = (TopicPartition(f"{topics.input}.big", 0), TopicPartition(f"{topics.input}.small", 0),
                         TopicPartition(topics.input, 0))
    consumer = FakeConsumer({big: 0, small: 0, plain: 0})
    consumer.log[big] = _records(big, [_event(f"big-{i}", "big", "tell me about bread " * 600) for i in range(30)])
    consumer.log[small] = _records(small, [_event(f"small-{i}", "small", "hi there") for i in range(4)])
    consumer.log[plain] = _records(plain, [_event(f"imp-{i}", "small", "I am small, honest") for i in range(2)])
    producer = FakeProducer(auto_ack=True)
    stream = monitor_stream(settings, monitor, WorkerMetrics())
    stream.consumer, stream.producer = consumer, producer
    stream.limits = ServiceLimits(max_in_flight=500, max_event_bytes=1 << 20, shutdown_deadline_s=5,
                                  commit_interval_s=0.01, liveness_max_stall_s=60, http_port=None)
    handler = stream.handler
    order: list[str] = []
    peak = {"big": 0}
    real_batch = monitor.tokenize_windows_batch

    def tokenize_batch(conversations: Any) -> Any:
        order.extend("small" if c[0].content == "hi there" else "big" if "bread" in c[0].content else "imp"
                     for c in conversations)
        peak["big"] = max(peak["big"], handler.waiting.in_flight_bytes("big"))
        return real_batch(conversations)

    monkeypatch.setattr(monitor, "tokenize_windows_batch", tokenize_batch)
    task = await running(stream)
    await until(lambda: all(consumer.last_commit(tp) == len(consumer.log[tp]) for tp in (big, small, plain)))
    await stopped(stream, task)
    assert not task.exception() and not stream.failed

    last_small = max(i for i, who in enumerate(order) if who == "small")
    assert order[:last_small].count("big") <= 3, f"small waited behind large events: {order}"
    big_bytes = len(consumer.log[big][0].value or b"")
    assert peak["big"] <= max(share, big_bytes), "big held more than its in-flight share"
    verdicts = {v["event_id"]: v for t, raw, _ in producer.sent if t == topics.verdicts
                for v in [orjson.loads(raw)]}
    assert len(verdicts) == 36, "every event has its verdict"
    assert {verdicts[f"small-{i}"]["tenant"] for i in range(4)} == {"small"}
    assert {(v["tenant"], v.get("claimed_tenant")) for k, v in verdicts.items() if k.startswith("imp")} == {
        ("default", "small")}
    assert "claimed_tenant" not in verdicts["big-0"], "a matching claim is not repeated"
    assert set(handler.budget.windows) == {"t:big", "t:small", "t:default"}
    assert handler.waiting.keys() == 0 and len(handler.waiting) == 0


class _Holding(EchoHandler):
    """Accepts records and keeps them in flight; holds back the partitions it is told to."""

    def __init__(self) -> None:
        super().__init__(publish=False)
        self.held: set[TopicPartition] = set()

    def held_partitions(self) -> set[TopicPartition]:
        return set(self.held)


async def test_a_tenant_past_its_waiting_share_pauses_only_the_partitions_feeding_it() -> None:
    flood, quiet = TopicPartition("conversations", 0), TopicPartition("conversations.quiet", 0)
    consumer = FakeConsumer({flood: 50, quiet: 0})
    handler = _Holding()
    handler.held = {flood}
    stream = make_stream(handler, consumer, FakeProducer(), max_in_flight=1_000)
    task = await running(stream)
    await until(lambda: flood in consumer.paused)
    consumer.log[quiet] = [record(quiet, o) for o in range(5)]
    await until(lambda: sum(e.tp == quiet for e in handler.accepted) == 5)
    assert not any(e.tp == flood for e in handler.accepted), "the held partition was fetched"
    handler.held = set()
    await until(lambda: sum(e.tp == flood for e in handler.accepted) == 50)
    assert not consumer.paused
    await stopped(stream, task)


def test_the_monitor_holds_the_partitions_of_a_tenant_past_its_waiting_share(
    monitor: Monitor, small_bundle: Path, cache_dir: Path
) -> None:
    from worker.decode import decode_event
    from worker.monitor import MonitorHandler, Waiting

    settings = worker_settings("unused:9092", small_bundle, cache_dir, topics=TopicsConfig(), group="g",
                               max_in_flight=100)
    handler = MonitorHandler(settings, monitor, WorkerMetrics())
    flood, quiet = TopicPartition("conversations", 1), TopicPartition("conversations.quiet", 0)
    for tp, tenant, n in ((flood, "default", 51), (quiet, "quiet", 50)):
        for r in _records(tp, [_event(f"{tenant}-{i}", tenant, "hi") for i in range(n)]):
            handler.waiting.put(tenant, Waiting(r, decode_event(r.value), None, 0.0), len(r.value or b""))
    assert handler.held_partitions() == {flood}


async def test_worker_under_the_header_source_trusts_only_the_gateways_hmac(
    monitor: Monitor, small_bundle: Path, cache_dir: Path
) -> None:
    """A gateway-signed event is scored under its tenant; a forged header, a header copied from another event and
    no header at all are scored (never dropped) under ``unverified`` and counted by reason."""
    topics = TopicsConfig()
    settings = worker_settings("unused:9092", small_bundle, cache_dir, topics=topics, group="g")
    settings = settings.model_copy(update={"tenant": TenantConfig(source="header",
                                                                  gateway_secret=SecretStr(SECRET.decode()))})
    tp = TopicPartition(topics.input, 0)
    stamp = int(time.time())
    signed = gateway_headers(SECRET, "ok", "acme", stamp)
    cases = [("ok", signed), ("forged", [(TENANT_HEADER, b"acme"), (AUTH_HEADER, b"v1:1:00")]),
             ("copied", signed), ("none", []),
             ("null", [(TENANT_HEADER, None), (AUTH_HEADER, None)])]  # Kafka allows null header values
    consumer = FakeConsumer({tp: 0})
    consumer.log[tp] = [dataclasses.replace(r, headers=tuple(h)) for r, (_, h) in
                        zip(_records(tp, [_event(e, "victim", "hello") for e, _ in cases]), cases, strict=True)]
    producer = FakeProducer(auto_ack=True)
    metrics = WorkerMetrics()
    stream = monitor_stream(settings, monitor, metrics)
    stream.consumer, stream.producer = consumer, producer
    stream.limits = ServiceLimits(max_in_flight=100, max_event_bytes=1 << 20, shutdown_deadline_s=5,
                                  commit_interval_s=0.01, liveness_max_stall_s=60, http_port=None)
    task = await running(stream)
    await until(lambda: consumer.last_commit(tp) == len(cases))
    await stopped(stream, task)
    verdicts = {v["event_id"]: (v["tenant"], v.get("claimed_tenant")) for t, raw, _ in producer.sent
                if t == topics.verdicts for v in [orjson.loads(raw)]}
    assert verdicts == {"ok": ("acme", "victim"), "forged": ("unverified", "victim"),
                        "copied": ("unverified", "victim"), "none": ("unverified", "victim"),
                        "null": ("unverified", "victim")}
    assert {r: metrics.tenant_unverified.labels(reason=r)._value.get() for r in ("mismatch", "missing", "malformed")
            } == {"mismatch": 2, "missing": 1, "malformed": 1}


def test_topics_create_makes_each_tenant_topic_like_the_input() -> None:
    from worker.config import WorkerConfig
    from worker.topics import topic_specs

    specs = {s.name: s for s in topic_specs(TopicsConfig(), WorkerConfig(), input_partitions=4, tenants=["acme"])}
    tenant, plain = specs["conversations.acme"], specs["conversations"]
    assert (tenant.partitions, tenant.config) == (plain.partitions, plain.config)
    assert re.match(subscription_pattern("conversations"), tenant.name)
