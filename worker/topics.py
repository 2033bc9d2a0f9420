"""The topics the monitor reads and writes: their partitions and configs, created once, checked at start.

One place decides what a topic looks like, so the CLI (``ctd-monitor topics create``), the demo, compose and the
Strimzi manifests (checked by tests/deploy) all agree. ``max.message.bytes`` leaves room above
``worker.max_event_bytes`` for the record's key, headers and batch framing: an event the worker accepts can be
written, and so can its review request and its (bounded, see ``worker.events.dead_letter``) dead letter.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from pydantic import Field

from probes.config import Frozen
from probes.errors import CtdError
from probes.logs import get_logger
from worker.config import RECORD_OVERHEAD_BYTES, KafkaConfig, TopicsConfig, WorkerConfig
from worker.tenancy import tenant_topic

log = get_logger(__name__)

RETENTION_MS = 7 * 24 * 3600 * 1000  # input and outputs: a week to replay from
AUDIT_RETENTION_MS = 30 * 24 * 3600 * 1000  # dead letters and alerts are read by people, later
_TOPIC_ALREADY_EXISTS = 36
_UNKNOWN_TOPIC_OR_PARTITION = 3


class TopicMissingError(CtdError):
    """A topic the monitor needs does not exist on the cluster."""

    def __init__(self, topics: Sequence[str], bootstrap: str) -> None:
        names = ", ".join(sorted(topics))
        super().__init__(
            f"topic {names} does not exist on {bootstrap}: create the topics with "
            f"`ctd-monitor topics create --bootstrap {bootstrap}`"
        )
        self.topics = tuple(sorted(topics))


class TopicSpec(Frozen):
    name: str
    partitions: int = Field(ge=1)
    replication_factor: int = Field(1, ge=1)
    config: dict[str, str] = Field(default_factory=dict)


class TopicOutcome(Frozen):
    name: str
    partitions: int
    created: bool
    config: dict[str, str]


def max_message_bytes(max_event_bytes: int) -> int:
    """The topics' ``max.message.bytes`` for events of at most ``max_event_bytes``."""
    return max_event_bytes + RECORD_OVERHEAD_BYTES


def dead_letter_bytes(max_event_bytes: int) -> int:
    """The largest dead-letter body: the topic's limit less room for its key (≤ 256 B) and headers."""
    return max_message_bytes(max_event_bytes) - 4096


def topic_specs(
    topics: TopicsConfig, worker: WorkerConfig, *, input_partitions: int = 3, output_partitions: int = 3,
    replication_factor: int = 1, tenants: Sequence[str] = (),
) -> tuple[TopicSpec, ...]:
    """Every topic with its partition count and config (workers scale up to ``input_partitions``); ``tenants``
    adds one input topic per tenant (``tenant.source: topic``, worker/tenancy.py), configured as the input."""
    common = {"max.message.bytes": str(max_message_bytes(worker.max_event_bytes))}
    if replication_factor > 1:
        # acks=all then means "on at least two brokers": one broker down loses nothing.
        common["min.insync.replicas"] = str(min(2, replication_factor))
    stream = {**common, "retention.ms": str(RETENTION_MS)}
    audit = {**common, "retention.ms": str(AUDIT_RETENTION_MS)}
    # Signed records carry their signing time; the broker's append time is what their freshness bound is measured
    # against (worker/signing.py): a replayed old record is appended late, a backlog read late still passes.
    signed = {**stream, "message.timestamp.type": "LogAppendTime"}
    rows = [
        (topics.input, input_partitions, stream), (topics.verdicts, output_partitions, signed),
        (topics.review, output_partitions, signed), (topics.dead_letter, 1, audit),
        (topics.alerts, 1, {**audit, "message.timestamp.type": "LogAppendTime"}),
        # Streamed responses (worker/responses.py): chunks keyed by response_id, one terminal verdict each.
        (topics.responses, input_partitions, stream), (topics.response_verdicts, output_partitions, signed),
        *((tenant_topic(topics.input, t), input_partitions, stream) for t in tenants),
        # Checkpoints of open responses (worker/response_state.py): the latest per response_id counts.
        (topics.response_state, output_partitions, {**stream, "cleanup.policy": "compact,delete"}),
    ]
    return tuple(TopicSpec(name=name, partitions=n, replication_factor=replication_factor, config=config)
                 for name, n, config in rows)


class KafkaUnreachableError(CtdError):
    """No broker answered at the configured bootstrap servers."""


@contextlib.asynccontextmanager
async def _admin(kafka: KafkaConfig) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(**kafka.client_kwargs())
    try:
        await admin.start()
    except KafkaError as exc:
        await admin.close()
        raise KafkaUnreachableError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc}") from exc
    try:
        yield admin
    finally:
        await admin.close()


async def create_topics(kafka: KafkaConfig, specs: Sequence[TopicSpec], *, timeout_s: float = 30) -> list[TopicOutcome]:
    """Create the topics that do not exist yet (existing ones are left as they are) and wait for their leaders.

    Idempotent: a second run reports every topic with ``created: false``.
    """
    async with _admin(kafka) as admin:
        new = [NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=dict(s.config)) for s in specs]
        response = await admin.create_topics(new, timeout_ms=int(timeout_s * 1000))
        created: dict[str, bool] = {}
        errors = []
        # aiokafka reports per-topic failures in the response instead of raising.
        for item in response.topic_errors:
            name, code, message = item[0], item[1], item[2] if len(item) > 2 else None
            if code == 0:
                created[name] = True
            elif code == _TOPIC_ALREADY_EXISTS:
                created[name] = False
            else:
                errors.append(f"{name}: error {code} {message or ''}".strip())
        if errors:
            raise CtdError("creating topics failed: " + "; ".join(errors))
        await _wait_leaders(admin, [s.name for s in specs], time.monotonic() + timeout_s)
    outcomes = [TopicOutcome(name=s.name, partitions=s.partitions, created=created.get(s.name, False),
                             config=dict(s.config)) for s in specs]
    log.info("kafka_topics_ready", created=[o.name for o in outcomes if o.created],
             existed=[o.name for o in outcomes if not o.created])
    return outcomes


async def _wait_leaders(admin: AIOKafkaAdminClient, names: Sequence[str], deadline: float) -> None:
    while True:
        described: list[dict[str, Any]] = await admin.describe_topics(list(names))
        waiting = [
            str(t.get("topic")) for t in described
            if t.get("error_code", 0) != 0 or not t.get("partitions")
            or not all(p.get("leader", -1) >= 0 for p in t["partitions"])
        ]
        if not waiting:
            return
        if time.monotonic() >= deadline:
            raise CtdError(f"topics without leaders after creation: {', '.join(sorted(waiting))}")
        await asyncio.sleep(0.1)


async def missing_topics(kafka: KafkaConfig, names: Sequence[str]) -> list[str]:
    """The names among ``names`` that do not exist on the cluster (order kept)."""
    async with _admin(kafka) as admin:
        existing = set(await admin.list_topics())
    return [name for name in names if name not in existing]


async def require_topics(kafka: KafkaConfig, names: Sequence[str]) -> None:
    """Raise TopicMissingError naming every missing topic and the command that creates them."""
    missing = await missing_topics(kafka, names)
    if missing:
        raise TopicMissingError(missing, kafka.bootstrap_servers)


async def describe_topic_configs(kafka: KafkaConfig, names: Sequence[str]) -> dict[str, dict[str, str]]:
    """topic → its config as the broker reports it (defaults included)."""
    async with _admin(kafka) as admin:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
    out: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.resources:
            # (error_code, error_message, resource_type, resource_name, config_entries)
            entries = resource[4]
            out[str(resource[3])] = {str(e[0]): str(e[1]) for e in entries}
    return out
