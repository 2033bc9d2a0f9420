"""A producer that rotates 5,000 tenant names and impersonates another tenant, through a plain aiokafka producer
against the worker process and the alerter on the real broker (``pytest -m hostile``; issue 22 item 5).

The deployment runs the default ``tenant.source: topic``: the victim writes to its own topic
``<input>.victim``; the attacker can write only to the plain input topic (in production, Kafka ACLs keep it off
the victim's topic), where it sends 5,000 harmful events under rotating tenant names and 200 large ones claiming to
be the victim, all before and after the victim's own events. Every event gets a final verdict (or a dead letter),
the worker's and the alerter's per-tenant tables stay bounded, the victim's alert bucket is not drained (its
alerts reach the sink) and its verdicts are not starved behind the flood.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import statistics
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from probes.data import read_file
from tests.worker.helpers import (
    counter_total,
    guard_settings,
    read_topic,
    scrape_metrics,
    spawn_worker,
    wait_for,
    worker_settings,
)
from worker.alerts import alert_stream
from worker.config import AlertsConfig, BudgetConfig, KafkaConfig, TenantConfig, TopicsConfig
from worker.events import Alert, utcnow
from worker.metrics import AlerterMetrics
from worker.tenancy import tenant_topic
from worker.topics import create_topics, topic_specs

pytestmark = [pytest.mark.hostile, pytest.mark.kafka]

MAX_EVENT_BYTES = 40_000
ROTATING = 5_000
IMPOSTOR = 40
VICTIM = 8
BURST = 5


class CollectingSink:
    name = "collect"

    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    async def deliver(self, alert: Alert) -> None:
        self.alerts.append(alert)


def _event(event_id: str, tenant: str, text: str) -> bytes:
    return orjson.dumps({"event_id": event_id, "conversation_id": f"c-{event_id}", "tenant": tenant,
                         "created_at": utcnow().isoformat(), "messages": [{"role": "user", "content": text}]})


async def _send(producer: AIOKafkaProducer, topic: str, values: list[tuple[str, bytes]]) -> None:
    futures = [await producer.send(topic, value, key=key.encode()) for key, value in values]
    await asyncio.gather(*futures)


def _latency_s(verdict: dict[str, Any], sent: dict[str, dt.datetime]) -> float:
    return (dt.datetime.fromisoformat(verdict["decided_at"]) - sent[verdict["event_id"]]).total_seconds()


async def test_rotating_tenant_names_and_impersonation_steer_nothing(
    kafka_broker: Any, small_bundle: Path, cache_dir: Path, datasets_dir: Path, tmp_path: Path,
) -> None:
    topics = TopicsConfig().suffixed(uuid.uuid4().hex[:8])
    s = worker_settings(kafka_broker.bootstrap, small_bundle, cache_dir, topics=topics,
                        group=f"tenant-{uuid.uuid4().hex[:6]}", max_event_bytes=MAX_EVENT_BYTES)
    s = s.model_copy(update={"tenant": TenantConfig(topic_refresh_ms=1_000),
                             "budget": BudgetConfig(scope="tenant", max_scopes=20),
                             "batching": s.batching.model_copy(update={"max_batch_tokens": 8192, "max_items": 128})})
    await create_topics(KafkaConfig(bootstrap_servers=kafka_broker.bootstrap),
                        topic_specs(topics, s.worker, input_partitions=2, tenants=["victim"]))
    victim_topic = tenant_topic(topics.input, "victim")

    sink = CollectingSink()
    g = guard_settings(kafka_broker.bootstrap, topics, cache_dir, alerts=AlertsConfig(
        group_id=f"alerter-{uuid.uuid4().hex[:6]}", log_sink=False, rate_limit_per_s=0.001, rate_burst=BURST,
        max_tenant_buckets=20))
    alerter = alert_stream(g, AlerterMetrics(), sinks=[sink])
    alerting = asyncio.create_task(alerter.run())

    harmful = [r.messages[0].content for r in read_file(datasets_dir / "harmbench.jsonl")]
    rotating = [(f"rot-{i}", _event(f"rot-{i}", f"rot-{i}", harmful[i % len(harmful)][:300])) for i in range(ROTATING)]
    # Large (windowed, expensive to tokenize and score) and claiming to be the victim.
    impostor = [(f"imp-{i}", _event(f"imp-{i}", "victim", (harmful[i % len(harmful)][:150] + " ") * 10))
                for i in range(IMPOSTOR)]
    attack = [*impostor[:IMPOSTOR // 2], *rotating[:ROTATING // 2], *impostor[IMPOSTOR // 2:],
              *rotating[ROTATING // 2:]]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all", max_request_size=1 << 21)
    await producer.start()
    sent: dict[str, dt.datetime] = {}
    try:
        with spawn_worker(s, tmp_path, "tenant-worker") as proc:
            await wait_for(lambda: proc.http_port() is not None, timeout=120)
            await wait_for(lambda: alerter.ready() or alerting.done(), 60)
            port = proc.http_port()
            assert port is not None
            rss_before = proc.rss_bytes()
            now = utcnow()
            sent.update((key, now) for key, _ in attack[:len(attack) // 2])
            await _send(producer, topics.input, attack[:len(attack) // 2])
            # The victim writes while half the flood is queued in front of it and the other half lands behind.
            victim = [(f"victim-{i}", _event(f"victim-{i}", "victim", harmful[-(i + 1)])) for i in range(VICTIM)]
            sent.update((key, utcnow()) for key, _ in victim)
            await _send(producer, victim_topic, victim)
            now = utcnow()
            sent.update((key, now) for key, _ in attack[len(attack) // 2:])
            await _send(producer, topics.input, attack[len(attack) // 2:])

            verdicts = await read_topic(kafka_broker.bootstrap, topics.verdicts,
                                        until=lambda r: {v["event_id"] for v in r} >= set(sent), timeout=600)
            metrics = await scrape_metrics(port)
            rss_after = proc.rss_bytes()
            assert proc.running(), "the worker is alive at the end"
            proc.terminate(30)
    finally:
        await producer.stop()

    # every event: a final verdict (the probe's; no expert runs here, delegated ones stay for the guard)
    by_id = {v["event_id"]: v for v in verdicts}
    assert set(by_id) >= set(sent), f"{len(set(sent) - set(by_id))} events without a verdict"
    # isolation keys on the topic; the payload's claim is recorded, never used
    assert {by_id[k]["tenant"] for k, _ in victim} == {"victim"}
    assert {by_id[k]["tenant"] for k, _ in attack} == {"default"}
    assert {by_id[k]["claimed_tenant"] for k, _ in impostor} == {"victim"}
    assert metrics["ctd_tenant_claims_overridden_total"] >= ROTATING + IMPOSTOR
    # bounded tables: the worker's budget windows and fair queue, the alerter's buckets
    assert metrics["ctd_tenant_scopes{table=budget}"] <= 2
    assert metrics["ctd_tenant_scopes{table=fair_queue}"] <= 2
    # the verdict metrics' tenant label: the resolved tenants (default pinned, victim in a place), never the claims
    labelled = {dict(pair.split("=", 1) for pair in k[k.index("{") + 1:-1].split(","))["tenant"]
                for k in metrics if k.startswith("ctd_verdicts_out_total{")}
    assert labelled == {"default", "victim"} and metrics["ctd_tenant_scopes{table=metric_labels}"] == 1
    print(f"worker RSS {rss_before / 2**20:.0f} MiB before the attack, {rss_after / 2**20:.0f} MiB after")

    # the victim is not starved: its verdicts come well before the flood's typical one
    victim_latency = [_latency_s(by_id[k], sent) for k, _ in victim]
    flood_latency = sorted(_latency_s(by_id[k], sent) for k, _ in attack)
    flood_median = statistics.median(flood_latency)
    print(f"victim verdict latency max {max(victim_latency):.2f}s; flood median {flood_median:.2f}s, "
          f"max {flood_latency[-1]:.2f}s")
    assert max(victim_latency) < flood_median, "the victim waited behind the flood"

    # the victim's alert bucket is its own: every victim alert raised reaches the sink (up to its burst)
    await wait_for(lambda: counter_total(alerter.metrics.consumed) >= len(verdicts), 120)
    await wait_for(lambda: alerter.tracker.in_flight() == 0, 60)
    alerts = await read_topic(kafka_broker.bootstrap, topics.alerts, until=lambda r: False, timeout=3)
    victim_raised = {a["event_id"] for a in alerts if a["tenant"] == "victim"}
    assert victim_raised, "no victim verdict was a final harmful one: the scenario tests nothing"
    await wait_for(lambda: len({a.event_id for a in sink.alerts if a.tenant == "victim"})
                   >= min(len(victim_raised), BURST), 30)
    assert {a["tenant"] for a in alerts} <= {"victim", "default"}
    assert sum(a.tenant == "default" for a in sink.alerts) <= BURST, "rotating names bought no fresh bursts"
    assert len(alerter.handler.buckets) <= 2
    alerter.stop()
    await asyncio.wait_for(alerting, 30)
