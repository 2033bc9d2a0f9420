"""Exactly-once commits (``processing.guarantee: exactly_once``): outputs and input offsets in one Kafka transaction.

At least once, an output is sent as soon as it is built and its offset committed once acknowledged: a crash
between the two answers the event twice. Exactly once, outputs are staged in memory by input offset and written at
the commit: per input partition, one transaction holds the outputs of the committable prefix of offsets and those
offsets (``send_offsets_to_transaction``), so a ``read_committed`` reader sees an event's outputs once, or not yet.

Staged rather than sent at once because micro-batches finish out of offset order and a partition's commit can only
claim a prefix: outputs of offsets past a gap, written in a transaction whose offsets do not cover them, would be
redone after a crash.

Fencing: one transactional producer per input partition, ``<prefix>-<group>-<topic>-<partition>`` (Kafka Streams'
per-task scheme). aiokafka's ``send_offsets_to_transaction`` carries no consumer-group generation (KIP-447), so the
transactional id is what fences: whoever is assigned the partition next starts a producer with the same id, the
broker aborts the previous owner's open transaction and fences its producer, and a zombie can no longer commit.
The new owner reads the committed offset only after that (``Stream`` seeks to it once the producer is up).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar

from aiokafka.errors import InvalidProducerEpoch, ProducerFenced

from probes.logs import get_logger
from worker.publish import PERMANENT, TRANSIENT, Record

log = get_logger(__name__)
P = TypeVar("P", bound=Hashable)

# The broker fenced this producer: another instance was given the partition and initialised its id.
FENCED: tuple[type[BaseException], ...] = (ProducerFenced, InvalidProducerEpoch)


class TransactionalProducer(Protocol):
    """The part of a transactional ``AIOKafkaProducer`` a commit uses (unit tests put a fake behind it)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future[Any]: ...
    async def begin_transaction(self) -> None: ...
    async def commit_transaction(self) -> None: ...
    async def abort_transaction(self) -> None: ...
    async def send_offsets_to_transaction(self, offsets: dict[Any, int], group_id: str) -> None: ...


@dataclass(slots=True)
class Staged:
    """One input offset's outputs, held until the transaction that also commits the offset.

    ``origin``: the input (for a dead letter in place of outputs the broker refuses); ``dead``: as in
    ``Outputs`` (False for outputs; a dead letter's (reason, error, stage) while a smaller one may be tried;
    None once it is the small one).
    """

    origin: object
    records: list[Record]
    on_acked: Callable[[], None] | None
    dead: object


class Outcome(Enum):
    COMMITTED = "committed"
    RETRY = "retry"  # aborted, nothing visible; the staged outputs are sent again at the next commit
    RESET = "reset"  # the producer is unusable: state dropped, the partition is re-read from its committed offset
    FENCED = "fenced"  # another instance owns the partition now: state dropped, hands off


# Builds the dead letter that replaces a staged entry whose output the broker refused for good:
# (origin, reason, error, dead) -> the dead-letter record and its own ``dead`` state.
DeadLetterFactory = Callable[[object, str, str, object], tuple[Record, object]]


class Transactions(Generic[P]):
    """Per input partition: a transactional producer and the outputs staged for its uncommitted offsets.

    Lives on the event loop; ``commit`` is called under the stream's commit lock, one partition at a time,
    so a producer never has two transactions open.
    """

    def __init__(self, *, group_id: str, prefix: str, factory: Callable[[str], TransactionalProducer],
                 dead_letter: DeadLetterFactory, timeout_s: float = 30.0) -> None:
        self.group_id = group_id
        self.prefix = prefix
        self._factory = factory
        self._dead_letter = dead_letter
        self._timeout_s = timeout_s
        self._producers: dict[P, TransactionalProducer] = {}
        self._staged: dict[P, dict[int, Staged]] = {}
        self._base: dict[P, int] = {}  # the committed offset: staged entries below it were committed already
        self.committed_transactions = 0
        self.aborted_transactions = 0

    def transactional_id(self, partition: P) -> str:
        topic, number = getattr(partition, "topic", ""), getattr(partition, "partition", partition)
        return f"{self.prefix}-{self.group_id}-{topic}-{number}"

    def owns(self, partition: P) -> bool:
        return partition in self._producers

    def staged(self, partition: P | None = None) -> int:
        if partition is not None:
            return len(self._staged.get(partition, {}))
        return sum(len(s) for s in self._staged.values())

    async def assign(self, partitions: set[P]) -> None:
        """Start (and so initialise) each partition's producer: fences and aborts the previous owner's."""
        for partition in partitions:
            old = self._producers.pop(partition, None)
            if old is not None:
                await _stop_quietly(old)
            producer = self._factory(self.transactional_id(partition))
            await producer.start()
            # aiokafka initialises the producer id in the background: begin_transaction waits for it. Run one
            # empty transaction now so the previous owner's open transaction is aborted before offsets are read.
            await asyncio.wait_for(producer.begin_transaction(), self._timeout_s)
            await asyncio.wait_for(producer.abort_transaction(), self._timeout_s)
            self._producers[partition] = producer
            self._staged[partition] = {}
            self._base.pop(partition, None)
            log.info("transactions.assigned", transactional_id=self.transactional_id(partition))

    def set_base(self, partition: P, offset: int | None) -> None:
        """The committed offset read after ``assign``: nothing below it is ever sent again."""
        if offset is not None:
            self._base[partition] = offset

    async def release(self, partitions: set[P] | list[P]) -> None:
        """Drop revoked (or fenced) partitions: close their producers; their staged outputs are the new owner's."""
        for partition in partitions:
            self._staged.pop(partition, None)
            self._base.pop(partition, None)
            producer = self._producers.pop(partition, None)
            if producer is not None:
                await _stop_quietly(producer)

    async def close(self) -> None:
        await self.release(list(self._producers))

    def stage(self, partition: P, offset: int, entry: Staged) -> bool:
        """Hold an offset's outputs for its transaction; False when the partition is not ours (revoked)."""
        staged = self._staged.get(partition)
        if staged is None:
            return False
        staged[offset] = entry  # a re-read offset's later copy replaces the earlier: the same input's outputs
        return True

    async def commit(self, partition: P, position: int) -> Outcome:
        """One transaction: the outputs staged below ``position`` and the offset ``position``, atomically."""
        producer = self._producers.get(partition)
        if producer is None:
            log.error("transactions.no_producer", transactional_id=self.transactional_id(partition))
            return Outcome.FENCED
        staged = self._staged[partition]
        base = self._base.get(partition)
        if base is not None:
            for offset in [o for o in staged if o < base]:
                del staged[offset]  # a copy from before a re-read: committed by an earlier transaction
        while True:
            entries = sorted((o, e) for o, e in staged.items() if o < position)  # dead letters replace refusals
            try:
                outcome = await asyncio.wait_for(self._transaction(producer, partition, position, entries),
                                                 self._timeout_s)
            except FENCED as exc:
                log.error("transactions.fenced", transactional_id=self.transactional_id(partition), error=repr(exc))
                await self.release([partition])
                return Outcome.FENCED
            except Exception as exc:  # noqa: BLE001 - unknown state: abort, or start over from the commit
                self.aborted_transactions += 1
                log.warning("transactions.failed", transactional_id=self.transactional_id(partition),
                            error=repr(exc))
                return await self._abort(producer, partition)
            if outcome is not None:
                return outcome
            # Some outputs were refused for good and replaced by dead letters: the next attempt sends those.

    async def _transaction(self, producer: TransactionalProducer, partition: P, position: int,
                           entries: list[tuple[int, Staged]]) -> Outcome | None:
        await producer.begin_transaction()
        failed = await _send_all(producer, entries)
        if failed:
            await producer.abort_transaction()
            self.aborted_transactions += 1
            if not self._replace_refused(partition, failed):
                for _, _, exc in failed:
                    log.warning("transactions.send_retry", transactional_id=self.transactional_id(partition),
                                error=repr(exc))
                return Outcome.RETRY
            return None
        await producer.send_offsets_to_transaction({partition: position}, self.group_id)
        await producer.commit_transaction()
        self.committed_transactions += 1
        staged = self._staged.get(partition, {})
        for offset, entry in entries:
            staged.pop(offset, None)
        self._base[partition] = position
        for _, entry in entries:
            if entry.on_acked is not None:
                entry.on_acked()
        return Outcome.COMMITTED

    def _replace_refused(self, partition: P, failed: list[tuple[int, Staged, BaseException]]) -> bool:
        """Dead letters in place of outputs the broker can never take; False while any failure is transient."""
        if any(not isinstance(exc, PERMANENT) and isinstance(exc, TRANSIENT) for _, _, exc in failed):
            return False
        staged = self._staged[partition]
        for offset, entry, exc in failed:
            if entry.dead is None:
                return False  # even the small dead letter is refused: the offset stays uncommitted (liveness red)
            reason, error = ("publish_refused", repr(exc)) if entry.dead is False else ("", "")
            record, dead = self._dead_letter(entry.origin, reason, error, entry.dead)
            log.error("publish.refused", transactional_id=self.transactional_id(partition), offset=offset,
                      error=repr(exc))
            staged[offset] = Staged(entry.origin, [record], None, dead)
        return True

    async def _abort(self, producer: TransactionalProducer, partition: P) -> Outcome:
        try:
            await asyncio.wait_for(producer.abort_transaction(), self._timeout_s)
            return Outcome.RETRY
        except FENCED:
            await self.release([partition])
            return Outcome.FENCED
        except Exception as exc:  # noqa: BLE001 - the producer is unusable: a new one, and redo from the commit
            log.warning("transactions.abort_failed", transactional_id=self.transactional_id(partition),
                        error=repr(exc))
            await self.release([partition])
            return Outcome.RESET


async def _send_all(producer: TransactionalProducer, entries: list[tuple[int, Staged]]
                    ) -> list[tuple[int, Staged, BaseException]]:
    """Enqueue every record (so the producer batches them), then await each ack; the entries that failed."""
    enqueued: list[list[asyncio.Future[Any] | BaseException]] = []
    for _, entry in entries:
        futures: list[asyncio.Future[Any] | BaseException] = []
        for r in entry.records:
            try:
                futures.append(await producer.send(r.topic, r.value, key=r.key, headers=list(r.headers)))
            except Exception as exc:  # noqa: BLE001 - told apart by _replace_refused
                futures.append(exc)
        enqueued.append(futures)
    failed: list[tuple[int, Staged, BaseException]] = []
    for (offset, entry), futures in zip(entries, enqueued, strict=True):
        for future in futures:
            try:
                if isinstance(future, BaseException):
                    raise future
                await future
            except FENCED:
                raise
            except Exception as exc:  # noqa: BLE001
                failed.append((offset, entry, exc))
                break
    return failed


async def _stop_quietly(producer: TransactionalProducer) -> None:
    try:
        await asyncio.wait_for(producer.stop(), 10.0)
    except Exception as exc:  # noqa: BLE001 - a fenced or broken producer may fail to close cleanly
        log.warning("transactions.producer_stop_failed", error=repr(exc))
