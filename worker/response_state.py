"""Checkpoints of open streamed responses on a compacted topic, so their scored chunks can be committed.

A checkpoint (key ``response_id``) holds what the stream scorer needs to go on without the chunks already
scored: the prefix and scored token ids, their probe logits (the aggregate is replayed from them), the text
after the incremental-tokenization anchor, the next expected ``seq`` and the partition the chunks come from.
A closed response's last checkpoint says so (``closed``), so its late or re-delivered chunks are dropped. The
topic is ``cleanup.policy=compact,delete`` (worker/topics.py): the latest checkpoint of a key is what counts,
and closed responses age out with the retention.

Checkpoints are signed with the worker role's key (kind ``response_state``, worker/signing.py) and a reader
keeps only those: an unsigned one written by whoever can reach the topic could close a live response unjudged
("closed") or make its real chunks count as duplicates (a high ``next_seq``). No freshness bound: a checkpoint
is state, not a command, and the reader keeps the furthest along of a response's, so replaying an older genuine
one moves nothing forward.

Several records of one key may be read out of write order (a retried send lands after a newer one): the
reader keeps the one furthest along (a closed one wins), never simply the last.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaConsumer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from probes.logs import get_logger
from worker.config import KafkaConfig
from worker.signing import WORKER, SignatureError, Signer
from worker.stream import Record

log = get_logger(__name__)
STATE_TOPIC_WAIT_S = 30.0


class ResponseCheckpoint(BaseModel):
    """Where one streamed response stands; enough to resume scoring it after a restart or a rebalance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = 1
    response_id: str
    topic: str
    partition: int
    next_seq: int = Field(ge=0)
    closed: str | None = Field(None, description="the verdict's reason once the response is closed")
    tenant: str
    conversation_id: str | None
    metadata: dict[str, Any] = Field(default_factory=dict)
    prefix: list[int] = Field(default_factory=list)
    scored: list[int] = Field(default_factory=list)
    logits: list[float] = Field(default_factory=list)
    text: str = Field("", description="the neutralised response text after the anchor")
    anchor_tok: int = 0
    last_seq: int = -1
    chunks: int = 0
    text_bytes: int = 0
    written_at: dt.datetime

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    def further_than(self, other: ResponseCheckpoint) -> bool:
        if (self.closed is None) != (other.closed is None):
            return self.closed is not None
        return self.next_seq > other.next_seq


def decode_checkpoint(value: bytes | None) -> ResponseCheckpoint | None:
    """A checkpoint, or None for a record that is not one (logged: the topic is ours, so it is a bug or an attack)."""
    if not value:
        return None
    try:
        return ResponseCheckpoint.model_validate(orjson.loads(value))
    except (orjson.JSONDecodeError, ValidationError) as exc:
        log.warning("response_state.undecodable", error=type(exc).__name__)
        return None


def verified_checkpoint(record: Record, signer: Signer) -> ResponseCheckpoint | None:
    """The checkpoint in ``record`` if the worker role signed it (unchecked only under ``signing.insecure_dev``
    without the key), else None: a refusal is counted and logged by the signer."""
    try:
        signer.verify_record("response_state", record, roles=WORKER, max_age_s=math.inf)
    except SignatureError:
        return None
    return decode_checkpoint(record.value)


class StateLog(Protocol):
    """Reads the checkpoints written since the last call (the first call: all of them)."""

    async def read_new(self) -> list[ResponseCheckpoint]: ...

    async def close(self) -> None: ...


class KafkaStateLog:
    """The state topic read from the beginning, then on each call up to the end offsets it has at that moment.

    Called before the first chunk of a newly assigned partition is handled: the previous owner's checkpoints
    were acknowledged before it committed the offsets they cover, so they are all below those end offsets.
    """

    def __init__(self, kafka: KafkaConfig, topic: str, *, max_bytes: int, signer: Signer) -> None:
        self.kafka = kafka
        self.topic = topic
        self.max_bytes = max_bytes
        self.signer = signer
        self._consumer: AIOKafkaConsumer | None = None
        self._early: list[Record] = []  # read while waiting for the assignment

    async def _start(self) -> AIOKafkaConsumer:
        # Subscribed without a group: every partition of the topic is assigned, read from the earliest offset.
        consumer = AIOKafkaConsumer(self.topic, **self.kafka.client_kwargs(), group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest",
                                    fetch_max_bytes=8 * self.max_bytes, max_partition_fetch_bytes=2 * self.max_bytes)
        await consumer.start()
        try:
            deadline = time.monotonic() + STATE_TOPIC_WAIT_S
            while not consumer.assignment():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"state topic {self.topic!r} not found: create it (ctd-monitor topics create)")
                batch = await consumer.getmany(timeout_ms=200)
                self._early.extend(r for rs in batch.values() for r in rs if r.value)
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    async def read_new(self) -> list[ResponseCheckpoint]:
        if self._consumer is None:
            self._consumer = await self._start()
        consumer = self._consumer
        records, self._early = self._early, []
        ends = await consumer.end_offsets(list(consumer.assignment()))
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            batch = await consumer.getmany(timeout_ms=200, max_records=1000)
            records.extend(r for rs in batch.values() for r in rs if r.value)
        return [c for r in records if (c := verified_checkpoint(r, self.signer)) is not None]

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
