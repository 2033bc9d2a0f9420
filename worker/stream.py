"""The at-least-once stream core: fetch, backpressure, rebalance, acknowledgement tracking and commits.

One core drives every service; what a service does with its records is a ``Handler`` (monitor, guard,
alerter). The handler reports outcomes through ``Outputs`` (publish, dead-letter, done); the core commits
only what the broker acknowledged. docs/architecture.md describes the stages and the commit discipline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, NamedTuple, Protocol, TypeAlias, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from prometheus_client import Counter

from probes.logs import get_logger
from worker.commits import CommitTracker
from worker.config import KafkaConfig, ProcessingConfig, ServiceConfig
from worker.deadline import Deadline
from worker.events import dead_letter
from worker.health import HealthServer
from worker.metrics import ConsumerMetrics
from worker.publish import PERMANENT, TRANSIENT, RetryPolicy, send_all_acknowledged
from worker.publish import Record as OutRecord
from worker.topics import dead_letter_bytes
from worker.transactions import Outcome, Staged, TransactionalProducer, Transactions

log = get_logger(__name__)
# Exactly once: the first wait before a failed producer start is tried again, and the longest.
_ASSIGN_RETRY_S = 1.0
_ASSIGN_RETRY_MAX_S = 30.0
Stage = Literal["decode", "inference", "expert", "publish"]
# A dead letter's Kafka key: enough of the original to find it, never the whole of a hostile multi-MB key.
_DEAD_LETTER_KEY_BYTES = 256
_SMALL_DEAD_LETTER_BYTES = 8192
Record: TypeAlias = "ConsumerRecord[bytes, bytes]"
T = TypeVar("T")
H = TypeVar("H", bound="Handler")


@dataclass(frozen=True)
class ServiceLimits:
    max_in_flight: int
    max_event_bytes: int
    shutdown_deadline_s: float
    commit_interval_s: float
    liveness_max_stall_s: float
    http_host: str = "0.0.0.0"
    http_port: int | None = 8080  # None: no HTTP server of its own (it shares its process's)
    # A partition whose in-flight records reach this pauses alone (``max_in_flight`` still pauses them all):
    # one partition held back on purpose (an open streamed response) does not stop the others.
    max_in_flight_per_partition: int | None = None

    @classmethod
    def from_config(cls, config: ServiceConfig, *, max_event_bytes: int, serve_http: bool = True,
                    max_in_flight: int | None = None) -> ServiceLimits:
        """The limits of a service from its settings section (``worker.*`` or ``guard.*``)."""
        return cls(max_in_flight=config.max_in_flight if max_in_flight is None else max_in_flight,
                   max_event_bytes=max_event_bytes, shutdown_deadline_s=config.shutdown_deadline_s,
                   commit_interval_s=config.commit_interval_s, liveness_max_stall_s=config.liveness_max_stall_s,
                   http_host=config.http_host, http_port=config.http_port if serve_http else None)


@dataclass(slots=True)
class Envelope(Generic[T]):
    """One consumed record in flight: its origin (for the commit and a dead letter) and what it decoded to."""

    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes
    body: T
    consumed_at: float

    @classmethod
    def of(cls, record: Record, body: T, consumed_at: float) -> Envelope[T]:
        return cls(TopicPartition(record.topic, record.partition), record.offset, record.key, record.value or b"",
                   body, consumed_at)


class Message(NamedTuple):
    """One output record; every message of an input must be acknowledged before its offset is done."""

    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]] | None = None


# A record to finish, its outputs, and what to run once the broker acknowledged them all.
Publication: TypeAlias = "tuple[Envelope[Any], Sequence[Message], Callable[[], None] | None]"
# A dead letter's (reason, error, stage) while a smaller one may still be tried; None once it is the small one;
# False for ordinary outputs.
_DeadLetterRetry: TypeAlias = "tuple[str, str, Stage] | None | bool"
_AckEntry: TypeAlias = (
    "tuple[Envelope[Any] | Record | None, Sequence[OutRecord], Callable[[], None] | None, _DeadLetterRetry]"
)


class Consumer(Protocol):
    """The part of ``AIOKafkaConsumer`` the core uses (unit tests put an in-memory fake behind it)."""

    def subscribe(self, topics: list[str], listener: ConsumerRebalanceListener) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[Record]]: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def assignment(self) -> set[TopicPartition]: ...
    async def commit(self, offsets: dict[TopicPartition, int]) -> None: ...
    def highwater(self, partition: TopicPartition) -> int | None: ...
    async def committed(self, partition: TopicPartition) -> int | None: ...


class Producer(Protocol):
    """The part of ``AIOKafkaProducer`` the core uses: ``send`` enqueues and returns the broker-ack future."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future[Any]: ...


class Handler(Protocol):
    """What one service does with its records; the core owns everything Kafka."""

    name: str

    async def start(self, outputs: Outputs) -> None:
        """The producer is up and the consumer not yet subscribed (load clients, keep ``outputs``)."""
        ...

    async def accept(self, records: Sequence[Record]) -> None:
        """Fresh records, already tracked: each must end published, dead-lettered or done, or stay in flight."""
        ...

    async def run(self) -> None:
        """The handler's own work loop until cancelled (returning early is fine: nothing else to do)."""
        ...

    def busy(self) -> bool:
        """True while accepted work is not yet handed to the producer (a drain waits for it)."""
        ...

    def waiting_on_purpose(self) -> bool:
        """True while commits are held back deliberately (a restart would not help: liveness stays green)."""
        ...

    def wake(self) -> None:
        """Look at the work again now (a drain, a revoke or a stop is waiting)."""
        ...

    async def close(self) -> None:
        """Release executors and clients; runs last during shutdown."""
        ...


class OutputsSlot:
    """The ``Outputs`` a stream hands its handler in ``start``; every handler keeps one."""

    _out: Outputs | None = None

    @property
    def out(self) -> Outputs:
        assert self._out is not None, "the stream has not started this handler"
        return self._out

    async def start(self, outputs: Outputs) -> None:
        self._out = outputs


class Outputs:
    """How a handler finishes a record: publish its outputs, dead-letter it, or mark it done."""

    def __init__(self, stream: Stream[Any], producer: Producer) -> None:
        self._stream = stream
        self._producer = producer
        self._metrics = stream.metrics
        self._tracker = stream.tracker
        self.pending_acks: set[asyncio.Task[None]] = set()
        self.retry = RetryPolicy()

    @property
    def stopping(self) -> bool:
        """The stream is draining: flush what is held, do not start waiting for anything."""
        return self._stream.stopping.is_set()

    async def sleep(self, seconds: float) -> None:
        """Sleep, but return as soon as the stream starts stopping."""
        try:
            await asyncio.wait_for(self._stream.stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    def done(self, item: Envelope[Any]) -> None:
        """Nothing to publish for this record."""
        self._tracker.done(item.tp, item.offset)

    def publish(self, item: Envelope[Any], messages: Sequence[Message],
                on_acked: Callable[[], None] | None = None) -> None:
        """Send the outputs; the offset is done once the broker acknowledged all of them (then ``on_acked``).

        Transient failures (broker down, leader moving) are retried with backoff until acknowledged; an output
        the broker can never take (too large, not authorised) dead-letters the input instead.
        """
        self.publish_many([(item, messages, on_acked)])

    def publish_detached(self, messages: Sequence[Message], on_acked: Callable[[], None] | None = None) -> None:
        """Outputs owed to no record in flight (a handler's own timer closing what it checkpointed earlier).

        Retried like any output; nothing is committed on its account, so the handler's checkpoint is what
        makes it happen again after a crash.
        """
        records = [OutRecord(m.topic, m.value, m.key, tuple(m.headers or ())) for m in messages]
        self._track_acks_many([(None, records, on_acked, False)])

    def publish_many(self, batch: Sequence[Publication]) -> None:
        """``publish`` for many records with one acknowledgement task; each offset still succeeds or fails alone."""
        self._track_acks_many([
            (item, [OutRecord(m.topic, m.value, m.key, tuple(m.headers or ())) for m in messages], on_acked, False)
            for item, messages, on_acked in batch
        ])

    def dead_letter(self, item: Envelope[Any] | Record, reason: str, error: str, stage: Stage, *,
                    max_bytes: int | None = None) -> None:
        """Publish the original bytes with the reason; the offset is done once the dead letter is acknowledged.

        The dead letter is truncated to fit the topic's ``max.message.bytes`` as ``topics create`` sets it
        (worker/topics.py), so it can always be written and never wedges the partition.
        """
        record = self._dead_letter_record(item, reason, error, stage, max_bytes=max_bytes)
        self._track_acks_many([(item, [record], None, (reason, error, stage) if max_bytes is None else None)])

    def _dead_letter_record(self, item: Envelope[Any] | Record, reason: str, error: str, stage: Stage, *,
                            max_bytes: int | None = None) -> OutRecord:
        tp, offset, key, value = _origin(item)
        dl = dead_letter(reason=reason, error=error, topic=tp.topic, partition=tp.partition, offset=offset, key=key,
                         value=value, stage=stage,
                         max_bytes=max_bytes or dead_letter_bytes(self._stream.limits.max_event_bytes))
        self._metrics.dead_letters.labels(stage=stage, reason=reason).inc()
        log.warning("dead_letter", service=self._stream.name, reason=reason, topic=tp.topic, partition=tp.partition,
                    offset=offset, stage=stage)
        short_key = None if key is None else key[:_DEAD_LETTER_KEY_BYTES]
        return OutRecord(self._stream.dead_letter_topic, dl.to_json(), short_key)

    def refused_dead_letter(self, origin: object, reason: str, error: str, dead: object) -> tuple[OutRecord, object]:
        """Exactly once: the dead letter that replaces a staged entry the broker refused (``Transactions``)."""
        assert isinstance(origin, (Envelope, ConsumerRecord))
        if isinstance(dead, tuple):  # a dead letter too large for the topic: a small one still frees the partition
            return self._dead_letter_record(origin, *dead, max_bytes=_SMALL_DEAD_LETTER_BYTES), None
        return self._dead_letter_record(origin, reason, error, "publish"), (reason, error, "publish")

    def _track_acks_many(self, entries: list[_AckEntry]) -> None:
        """Send every entry's records, then mark each offset done once all of its records are acknowledged.

        One task per batch, not per record: per-record tasks were the event loop's largest cost at a few thousand
        events/s (allocation-driven garbage collections included). Everything is enqueued before any ack is
        awaited, so the producer batches it; an entry with a failed send is retried in a task of its own, so its
        backoff never holds up the other entries' offsets.

        Exactly once, nothing is sent here: the outputs are staged for the transaction that commits their offset.
        """
        transactions = self._stream.transactions
        if transactions is not None:
            for item, records, on_acked, dead in entries:
                tp, offset, _, _ = _origin(item)
                if transactions.stage(tp, offset, Staged(item, list(records), on_acked, dead)):
                    self._tracker.done(tp, offset)
            return

        async def wait() -> None:
            enqueued: list[list[Awaitable[Any] | BaseException]] = []
            for _, records, _, _ in entries:
                futures: list[Awaitable[Any] | BaseException] = []
                for r in records:
                    try:
                        # send() enqueues the record and returns a future for the broker's ack.
                        futures.append(await self._producer.send(r.topic, r.value, key=r.key, headers=list(r.headers)))
                    except Exception as exc:  # noqa: BLE001
                        futures.append(exc)
                enqueued.append(futures)
            for (item, records, on_acked, dead), futures in zip(entries, enqueued, strict=True):
                failed = await _failures(records, futures)
                if not failed:
                    self._acked(item, on_acked)
                else:
                    self._track(self._retry_then_ack(item, failed, on_acked, dead))

        self._track(wait())

    def _track(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task the drain waits for (``pending_acks``)."""
        task = asyncio.create_task(work)
        self.pending_acks.add(task)
        task.add_done_callback(self.pending_acks.discard)

    def _acked(self, item: Envelope[Any] | Record | None, on_acked: Callable[[], None] | None) -> None:
        if item is not None:
            tp, offset, _, _ = _origin(item)
            self._tracker.done(tp, offset)
        if on_acked is not None:
            on_acked()

    async def _retry_then_ack(self, item: Envelope[Any] | Record | None,
                              failed: list[tuple[OutRecord, BaseException]],
                              on_acked: Callable[[], None] | None, dead: _DeadLetterRetry) -> None:
        if await self._retried(item, failed, dead):
            self._acked(item, on_acked)

    async def _retried(self, item: Envelope[Any] | Record | None, failed: list[tuple[OutRecord, BaseException]],
                       dead: _DeadLetterRetry) -> bool:
        """True once the records whose first send failed are acknowledged (transient failures retried with
        backoff); False when given up (the offset stays in flight) or dead-lettered instead.

        ``dead``: False for outputs; for a dead letter, its (reason, error, stage) while a smaller one may still be
        tried, None once it is the small one.
        """
        tp, offset = (_origin(item)[:2]) if item is not None else (TopicPartition("", -1), -1)
        try:
            for record, first in failed:
                if isinstance(first, PERMANENT) or not isinstance(first, TRANSIENT) or self._stream.stopping.is_set():
                    raise first
                self._metrics.publish_retries.inc()
                log.warning("publish.retry", topic=record.topic, error=type(first).__name__)
            await send_all_acknowledged(self._producer, [record for record, _ in failed], policy=self.retry,
                                        on_retry=lambda _: self._metrics.publish_retries.inc(),
                                        stopping=self._stream.stopping)
        except PERMANENT as exc:
            self._metrics.publish_errors.inc()
            log.error("publish.refused", service=self._stream.name, error=repr(exc), partition=tp.partition,
                      offset=offset)
            if item is None:
                pass  # detached: no input to dead-letter; the error log above is its trace
            elif dead is False:
                self.dead_letter(item, "publish_refused", repr(exc), "publish")
            elif isinstance(dead, tuple):
                # The topic takes less than we were told: a small dead letter still frees the partition.
                self.dead_letter(item, *dead, max_bytes=_SMALL_DEAD_LETTER_BYTES)
            return False
        except Exception as exc:  # noqa: BLE001
            # Given up (stopping) or an unknown failure: never committed, so whoever owns the partition next
            # re-reads it (no loss); liveness turns red once the commit position is stuck behind it.
            self._metrics.publish_errors.inc()
            log.error("publish.failed", service=self._stream.name, error=repr(exc), partition=tp.partition,
                      offset=offset)
            return False
        return True


async def _failures(records: Sequence[OutRecord], futures: Sequence[Awaitable[Any] | BaseException]
                    ) -> list[tuple[OutRecord, BaseException]]:
    """The records whose first send failed, with the error (every ack awaited, none retried here)."""
    failed: list[tuple[OutRecord, BaseException]] = []
    for record, future in zip(records, futures, strict=True):
        try:
            if isinstance(future, BaseException):
                raise future
            await future
        except Exception as error:  # noqa: BLE001 - told apart by _retried: transient, permanent or unknown
            failed.append((record, error))
    return failed


def _origin(item: Envelope[Any] | Record) -> tuple[TopicPartition, int, bytes | None, bytes | None]:
    if isinstance(item, Envelope):
        return item.tp, item.offset, item.key, item.value
    return TopicPartition(item.topic, item.partition), item.offset, item.key, item.value


async def split_on_failure(batch: list[T], attempt: Callable[[list[T]], Awaitable[None]],
                           give_up: Callable[[T, Exception], None], *, what: str) -> None:
    """Run ``attempt``; when it raises, halve the batch and retry each half, and give up on single items.

    One poisoned record (or a batch too large for memory) then costs only itself a dead letter.
    """
    try:
        await attempt(batch)
    except Exception as exc:  # noqa: BLE001 - whatever fails must fail for its record alone
        if len(batch) == 1:
            give_up(batch[0], exc)
            return
        log.warning(f"{what}.split_retry", size=len(batch), error=type(exc).__name__)
        half = len(batch) // 2
        for part in (batch[:half], batch[half:]):
            await split_on_failure(part, attempt, give_up, what=what)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, stream: Stream[Any]) -> None:
        self.stream = stream

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.stream.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.stream.on_assigned(set(assigned))
        await self.stream.assigned_transactional(set(assigned))


class Stream(Generic[H]):
    """Consume ``topic`` in ``group_id`` and let ``handler`` turn records into acknowledged outputs."""

    def __init__(
        self, handler: H, *, kafka: KafkaConfig, group_id: str, topic: str, dead_letter_topic: str,
        limits: ServiceLimits, metrics: ConsumerMetrics, consumer: Consumer | None = None,
        producer: Producer | None = None, pattern: str | None = None, metadata_max_age_ms: int = 300_000,
        processing: ProcessingConfig | None = None,
        transactional_producer: Callable[[str], TransactionalProducer] | None = None,
    ) -> None:
        self.handler = handler
        # A pattern (tenant.source topic: the input topic and one per tenant) replaces ``topic`` in the
        # subscription; aiokafka matches it again on every metadata refresh (``metadata_max_age_ms``).
        self.pattern = pattern
        self.metadata_max_age_ms = metadata_max_age_ms
        self.name = handler.name
        self.kafka = kafka
        self.group_id = group_id
        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        self.limits = limits
        self.metrics = metrics
        self.tracker: CommitTracker[TopicPartition] = CommitTracker()
        self.stopping = asyncio.Event()
        self._assigned: set[TopicPartition] = set()
        self._consumed: dict[TopicPartition, Counter] = {}  # the consumed counter's child per partition
        self._last_progress = time.monotonic()
        self._last_commit = time.monotonic()
        self._commit_lock = asyncio.Lock()
        self.failed = False
        self.consumer = consumer
        self.producer = producer
        self.outputs: Outputs | None = None
        self.health: HealthServer | None = None
        self.processing = processing or ProcessingConfig()
        self._transactional_producer = transactional_producer
        # Exactly once: partitions kept paused and out of commits (producer starting, or handed back after fencing).
        self._held: set[TopicPartition] = set()
        # Exactly once: partitions whose producer failed to start, still ours → (when to try again, backoff in s).
        self._assign_retry: dict[TopicPartition, tuple[float, float]] = {}
        # Exactly once: per input partition, a transactional producer and the outputs staged for its commit.
        self.transactions: Transactions[TopicPartition] | None = None

    # ---------------------------------------------------------------- lifecycle
    def stop(self) -> None:
        """Ask for a graceful drain (SIGTERM handler)."""
        self.stopping.set()
        self.handler.wake()

    def ready(self) -> bool:
        return bool(self._assigned) and not self.stopping.is_set()

    def live(self) -> tuple[bool, str]:
        """Alive while polls return and, when work is in flight, commits keep advancing."""
        now = time.monotonic()
        limit = self.limits.liveness_max_stall_s
        poll_age = now - self._last_progress
        commit_age = now - self._last_commit
        if poll_age > limit:
            return False, f"{self.name}: no poll for {poll_age:.1f}s"
        unhealthy = getattr(self.handler, "unhealthy", None)  # optional: a model failing every input
        why = unhealthy() if unhealthy is not None else None
        if why:
            return False, f"{self.name}: {why}"
        if self.tracker.in_flight() and commit_age > limit and not self.handler.waiting_on_purpose():
            return False, f"{self.name}: {self.tracker.in_flight()} in flight, no commit for {commit_age:.1f}s"
        return True, f"{self.name}: last poll {poll_age:.1f}s ago, last commit {commit_age:.1f}s ago"

    def _clients(self) -> tuple[Consumer, Producer]:
        common = self.kafka.client_kwargs()
        producer = self.producer or AIOKafkaProducer(**common, **self.kafka.producer_kwargs(self.limits.max_event_bytes))
        consumer = self.consumer or AIOKafkaConsumer(
            **common, group_id=self.group_id, enable_auto_commit=False, auto_offset_reset="earliest",
            # An exactly-once upstream's aborted or open transactions are never read (plain records read the same).
            isolation_level="read_committed",
            session_timeout_ms=self.kafka.session_timeout_ms, heartbeat_interval_ms=self.kafka.heartbeat_interval_ms,
            max_poll_interval_ms=self.kafka.max_poll_interval_ms, fetch_max_bytes=8 * self.limits.max_event_bytes,
            max_partition_fetch_bytes=2 * self.limits.max_event_bytes, metadata_max_age_ms=self.metadata_max_age_ms,
        )
        return consumer, producer

    def _new_transactional_producer(self, transactional_id: str) -> TransactionalProducer:
        if self._transactional_producer is not None:
            return self._transactional_producer(transactional_id)
        producer: TransactionalProducer = AIOKafkaProducer(
            **self.kafka.client_kwargs(), **self.kafka.producer_kwargs(self.limits.max_event_bytes),
            transactional_id=transactional_id, transaction_timeout_ms=self.processing.transaction_timeout_ms)
        return producer

    async def _wait_for_topics(self) -> None:
        """Without its topics a service would die on UnknownTopicOrPartition; it says which and waits instead."""
        from worker.topics import missing_topics

        names = [self.topic, self.dead_letter_topic]
        logged = False
        while not self.stopping.is_set():
            try:
                missing = await missing_topics(self.kafka, names)
            except Exception as exc:  # noqa: BLE001 - no broker yet: the clients' own retries handle that later
                log.warning(f"{self.name}.topic_check_failed", error=repr(exc))
                return
            if not missing:
                return
            if not logged:
                log.error("topics.missing", service=self.name, topics=missing,
                          hint=f"create them: ctd-monitor topics create --bootstrap {self.kafka.bootstrap_servers}")
                logged = True
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=5.0)
            except TimeoutError:
                pass

    async def run(self) -> None:
        if self.consumer is None:  # real clients: the topics must exist first
            await self._wait_for_topics()
        consumer, producer = self._clients()
        self.consumer, self.producer = consumer, producer
        if self.limits.http_port is not None:
            self.health = HealthServer(host=self.limits.http_host, port=self.limits.http_port,
                                       registry=self.metrics.registry, ready=self.ready, live=self.live)
            await self.health.start()
        await producer.start()
        self.outputs = Outputs(self, producer)
        if self.processing.exactly_once:
            self.transactions = Transactions(
                group_id=self.group_id, prefix=self.processing.transactional_id_prefix,
                factory=self._new_transactional_producer, dead_letter=self.outputs.refused_dead_letter,
                timeout_s=max(5.0, self.kafka.request_timeout_ms / 1000))
            log.info(f"{self.name}.exactly_once", prefix=self.processing.transactional_id_prefix)
        await self.handler.start(self.outputs)
        if self.pattern is not None and isinstance(consumer, AIOKafkaConsumer):
            consumer.subscribe(pattern=self.pattern, listener=_Rebalance(self))
        else:
            # In-memory consumers (unit tests) hand out their own partitions whatever they are subscribed to.
            consumer.subscribe([self.topic], listener=_Rebalance(self))
        await consumer.start()
        log.info(f"{self.name}.started", topic=self.topic, pattern=self.pattern, group=self.group_id)
        fetch = asyncio.create_task(self._fetch_loop(consumer), name="fetch")
        work = asyncio.create_task(self.handler.run(), name="work")
        commit = asyncio.create_task(self._commit_loop(), name="commit")
        stopping = asyncio.create_task(self.stopping.wait())
        try:
            waiting: set[asyncio.Task[Any]] = {stopping, fetch, work, commit}
            while True:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                crashed = [t for t in done if t is not stopping and not t.cancelled() and t.exception()]
                for task in crashed:
                    # A dead loop would leave a zombie that looks alive: stop, and let the supervisor restart us.
                    log.error(f"{self.name}.loop_crashed", loop=task.get_name(), error=repr(task.exception()))
                    self.failed = True
                if crashed or done != {work}:
                    break  # a stop, or a loop that must not end; a work loop may finish when it has no more to do
        finally:
            stopping.cancel()
            self.stopping.set()
            await self._shutdown(fetch, work, commit)
        if self.failed:
            raise RuntimeError(f"a {self.name} loop crashed; see the log")

    async def _shutdown(self, fetch: asyncio.Task[None], work: asyncio.Task[None],
                        commit: asyncio.Task[None]) -> None:
        deadline = Deadline(self.limits.shutdown_deadline_s)
        log.info(f"{self.name}.draining", in_flight=self.tracker.in_flight(), deadline_s=deadline.remaining())
        fetch.cancel()  # stop fetching first; the work and commit loops drain what is in hand
        await asyncio.gather(fetch, return_exceptions=True)
        try:
            # Keep a share of the deadline for the commit, leaving the group and flushing the producer.
            await asyncio.wait_for(self._drain(work), timeout=max(0.1, deadline.remaining() * 0.6))
        except TimeoutError:
            log.warning(f"{self.name}.drain_timeout", abandoned=self.tracker.in_flight())
        for task in (work, commit):
            task.cancel()
        await asyncio.gather(work, commit, return_exceptions=True)
        try:
            await self._commit(deadline)
            assert self.consumer is not None and self.producer is not None
            if self.transactions is not None:
                await self.transactions.close()
            # Commit before leaving the group: closing the consumer stops heartbeats and triggers the rebalance.
            for step, closing in (("consumer", self.consumer.stop()), ("producer", self.producer.stop())):
                try:
                    await asyncio.wait_for(closing, timeout=max(0.5, deadline.remaining()))
                except TimeoutError:
                    log.warning(f"{self.name}.stop_timeout", step=step)
        finally:
            if self.health is not None:
                await self.health.stop()
            await self.handler.close()
        log.info(f"{self.name}.stopped", left_in_flight=self.tracker.in_flight())

    async def _drain(self, work: asyncio.Task[None]) -> None:
        assert self.outputs is not None
        while (self.handler.busy() and not work.done()) or self.outputs.pending_acks:
            self.handler.wake()
            await asyncio.sleep(0.01)

    # ---------------------------------------------------------------- rebalance
    def _consumed_counter(self, tp: TopicPartition) -> Counter:
        child = self._consumed.get(tp)
        if child is None:
            child = self._consumed[tp] = self.metrics.consumed.labels(topic=tp.topic, partition=str(tp.partition))
        return child

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._assigned |= assigned
        for tp in assigned:  # a partition with nothing to read shows as 0 events/s, not as no series
            self._consumed_counter(tp)
        hook = getattr(self.handler, "assigned", None)  # optional: a handler with per-partition state rebuilds it
        if hook is not None:
            hook(assigned)
        self.metrics.rebalances.labels(kind="assigned").inc()
        self.metrics.ready.set(1 if self.ready() else 0)
        log.info("partitions.assigned", service=self.name,
                 partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Finish what is in flight for the revoked partitions within the deadline, commit, then let go."""
        self.metrics.rebalances.labels(kind="revoked").inc()
        deadline = Deadline(self.limits.shutdown_deadline_s)
        release = getattr(self.handler, "release", None)
        if release is not None:
            # A handler that holds records on purpose (open streamed responses) gives them up instead: they
            # were never done, so the new owner reads them again; waiting would only run out the deadline.
            release(revoked)
        while (release is None and any(self.tracker.in_flight(tp) for tp in revoked)
               and not deadline.expired()):
            self.handler.wake()
            await asyncio.sleep(0.02)
        await self._commit(deadline, only=revoked)
        # Queued work of partitions we no longer own would be done twice (here and by the new owner).
        prune = getattr(self.handler, "revoked", None)
        if prune is not None:
            prune(revoked)
        abandoned = sum(self.tracker.in_flight(tp) for tp in revoked)
        self.tracker.forget(revoked)
        self._held -= revoked
        if self.transactions is not None:
            await self.transactions.release(revoked)
        self._assigned -= revoked
        self.metrics.ready.set(1 if self.ready() else 0)
        log.info("partitions.revoked", service=self.name,
                 partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in revoked), abandoned=abandoned)

    async def assigned_transactional(self, assigned: set[TopicPartition]) -> None:
        """Exactly once: start each new partition's producer (fencing its previous owner, whose open transaction the
        broker aborts), then read the committed offset again, since a read before that could predate the abort.
        The partitions stay paused (and out of commits) until then."""
        if self.transactions is None or not assigned:
            return
        assert self.consumer is not None
        self._held |= assigned
        self.consumer.pause(*assigned)
        try:
            await self.transactions.assign(assigned)
            seek = getattr(self.consumer, "seek_to_committed", None)
            if seek is not None:
                committed: dict[TopicPartition, int | None] = await seek(*assigned)
                for tp, offset in committed.items():
                    self.transactions.set_base(tp, offset)
                    if offset is None or offset < 0:
                        await self.consumer.seek_to_beginning(tp)  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - without its producer a partition cannot commit: hand it back
            log.error("transactions.assign_failed", service=self.name, error=repr(exc))
            await self._hand_back(assigned)
            now = time.monotonic()
            for tp in assigned:  # no rebalance follows this failure: _retry_assignments tries again, with backoff
                last = self._assign_retry.get(tp)
                backoff = _ASSIGN_RETRY_S if last is None else min(2 * last[1], _ASSIGN_RETRY_MAX_S)
                self._assign_retry[tp] = (now + backoff, backoff)
            return
        for tp in assigned:
            self._assign_retry.pop(tp, None)
        self._held -= assigned
        live = assigned & self.consumer.assignment()
        if live:
            self.consumer.resume(*live)

    async def _hand_back(self, partitions: set[TopicPartition]) -> None:
        """Exactly once, a partition that cannot commit (fenced, or its producer failed to start): drop its state and
        stop reading it. Fenced, the group has given it to another member, and our next heartbeat rejoins."""
        prune = getattr(self.handler, "revoked", None)
        if prune is not None:
            prune(partitions)
        self.tracker.forget(partitions)
        if self.transactions is not None:
            await self.transactions.release(partitions)
        self._assigned -= partitions
        self._held |= partitions
        assert self.consumer is not None
        live = partitions & self.consumer.assignment()
        if live:
            self.consumer.pause(*live)
        self.metrics.ready.set(1 if self.ready() else 0)
        log.warning("partitions.handed_back", service=self.name,
                    partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in partitions))

    async def _redo(self, tp: TopicPartition) -> None:
        """Exactly once, the producer broke mid-transaction: start over from the committed offset."""
        prune = getattr(self.handler, "revoked", None)
        if prune is not None:
            prune({tp})
        self.tracker.forget([tp])
        log.warning("partition.redo", service=self.name, partition=f"{tp.topic}:{tp.partition}")
        await self.assigned_transactional({tp})

    # ---------------------------------------------------------------- fetch
    async def _fetch_loop(self, consumer: Consumer) -> None:
        limit = self.limits.max_in_flight
        per_partition = self.limits.max_in_flight_per_partition
        metrics = self.metrics
        paused = False
        # Partitions paused alone: those a handler holds back (the monitor: those feeding a tenant past its share
        # of the waiting events) and those at the per-partition limit, so one tenant's backlog or one long response
        # pauses its own partitions before it reaches the pause of them all.
        held_of: Callable[[], set[TopicPartition]] | None = getattr(self.handler, "held_partitions", None)
        held: set[TopicPartition] = set()
        while True:
            if self.tracker.in_flight() >= limit:
                # Pause every assigned partition (again: a rebalance may have added some), but keep calling
                # getmany: aiokafka leaves the group when it is not called for max_poll_interval_ms.
                consumer.pause(*consumer.assignment())
                if not paused:
                    paused = True
                    metrics.paused.set(1)
            elif paused:
                consumer.resume(*(consumer.assignment() - held - self._held))
                paused = False
                metrics.paused.set(1 if held else 0)
            if not paused and (held_of is not None or per_partition is not None):
                assigned = consumer.assignment()
                want: set[TopicPartition] = held_of() & assigned if held_of is not None else set()
                if per_partition is not None:
                    want |= {tp for tp in assigned if self.tracker.in_flight(tp) >= per_partition}
                # Paused again each round: an exactly-once assignment resumes its partitions when their producer is
                # up. Never resumed: a revoked partition, or one exactly-once holds (self._held).
                if want:
                    consumer.pause(*want)
                freed = ((held - want) & assigned) - self._held
                if freed:
                    consumer.resume(*freed)
                held = want
                metrics.paused.set(1 if held else 0)
            # With a per-partition limit, one fetch cannot overshoot it by more than itself.
            batch = await consumer.getmany(timeout_ms=100 if not paused else 20,
                                           max_records=min(500, limit, per_partition or limit))
            self._last_progress = time.monotonic()
            metrics.last_progress.set(time.time())
            records = []
            with metrics.stage_cpu("commit"):  # offset tracking is the commit's per-record share
                for record in (r for rs in batch.values() for r in rs):
                    tp = TopicPartition(record.topic, record.partition)
                    if tp not in self._assigned:
                        continue  # fetched before a revoke: the partition's new owner reads it from the commit
                    if not self.tracker.track(tp, record.offset):
                        log.info("partition.reseek", service=self.name, partition=tp.partition,
                                 offset=record.offset)
                    self._consumed_counter(tp).inc()
                    records.append(record)
            if records:
                await self.handler.accept(records)

    # ---------------------------------------------------------------- commit
    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.limits.commit_interval_s)
            await self._commit(None)
            await self._update_lag()
            await self._retry_assignments()

    async def _retry_assignments(self) -> None:
        """Exactly once: a partition whose producer failed to start (its transaction coordinator away a moment) is
        still assigned to us, and no rebalance follows such a failure: without this it stayed paused and unread,
        its lag growing, while liveness stayed green. Its start is tried again, with backoff, while it is ours."""
        if not self._assign_retry:
            return
        assert self.consumer is not None
        owned = self.consumer.assignment()
        for tp in [tp for tp in self._assign_retry if tp not in owned or tp not in self._held]:
            del self._assign_retry[tp]  # revoked meanwhile: its new owner starts it
        now = time.monotonic()
        due = {tp for tp, (at, _) in self._assign_retry.items() if at <= now and tp not in self._assigned}
        if due and not self.stopping.is_set():
            self.on_assigned(due)
            await self.assigned_transactional(due)

    async def _commit(self, deadline: Deadline | None, only: set[TopicPartition] | None = None) -> None:
        assert self.consumer is not None
        async with self._commit_lock:
            with self.metrics.stage_cpu("commit"):
                offsets = self.tracker.committable()
            if only is not None:
                offsets = {tp: o for tp, o in offsets.items() if tp in only}
            offsets = {tp: o for tp, o in offsets.items() if tp in self._assigned and tp not in self._held}
            self.metrics.in_flight.set(self.tracker.in_flight())
            if not offsets:
                if not self.tracker.in_flight():
                    self._last_commit = time.monotonic()  # nothing owed: idle is not stuck
                return
            timeout = None if deadline is None else max(0.1, deadline.remaining())
            if self.transactions is not None:
                await self._commit_transactions(offsets, timeout)
                return
            try:
                await asyncio.wait_for(self.consumer.commit(offsets), timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - a failed commit only means re-delivery later
                log.warning("commit.failed", service=self.name, error=repr(exc))
                return
            self.tracker.mark_committed(offsets)
            self._last_commit = time.monotonic()
            self.metrics.last_progress.set(time.time())

    async def _commit_transactions(self, offsets: dict[TopicPartition, int], timeout: float | None) -> None:
        """Exactly once: one transaction per partition (its staged outputs and its offset); the lock is held."""
        assert self.transactions is not None
        for tp, position in offsets.items():
            try:
                outcome = await asyncio.wait_for(self.transactions.commit(tp, position), timeout=timeout)
            except TimeoutError:
                # Cancelled mid-transaction (a shutdown's deadline): the broker aborts it once the next owner
                # initialises the partition's producer, or after transaction_timeout_ms.
                log.warning("commit.failed", service=self.name, error="transaction timed out", partition=tp.partition)
                return
            if outcome is Outcome.COMMITTED:
                self.tracker.mark_committed({tp: position})
                self._last_commit = time.monotonic()
                self.metrics.last_progress.set(time.time())
            elif outcome is Outcome.FENCED:
                await self._hand_back({tp})
            elif outcome is Outcome.RESET:
                await self._redo(tp)
            else:
                log.warning("commit.failed", service=self.name, error="transaction aborted", partition=tp.partition)

    async def _update_lag(self) -> None:
        assert self.consumer is not None
        # A partition can leave the consumer's assignment before the revoke callback updates ``_assigned`` (the
        # callback awaits commits): aiokafka asserts on such a partition, and a lag gauge must not crash the loop.
        for tp in list(self._assigned & self.consumer.assignment()):
            try:
                high = self.consumer.highwater(tp)
                position = self.tracker.position(tp)
                if high is None:
                    continue
                committed = position if position is not None else await self.consumer.committed(tp)
            except (AssertionError, KafkaError) as exc:
                log.debug("lag.skipped", service=self.name, partition=tp.partition, error=repr(exc))
                continue
            if committed is not None:
                self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    high - committed
                )
