"""Unit tests of the exactly-once commit (worker/transactions.py) against an in-memory transactional producer.

The real-broker proof (kill -9 mid-stream, zero duplicates) is tests/worker/test_exactly_once.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, ProducerFenced

from worker.publish import Record
from worker.transactions import Outcome, Staged, Transactions

TP = TopicPartition("conversations", 0)


class FakeProducer:
    """Records what a transaction made visible: only committed transactions' records and offsets."""

    def __init__(self, transactional_id: str) -> None:
        self.transactional_id = transactional_id
        self.open: list[tuple[str, bytes]] | None = None
        self.offsets: dict[Any, int] = {}
        self.visible: list[tuple[str, bytes]] = []
        self.committed_offsets: dict[Any, int] = {}
        self.refuse: set[bytes] = set()  # values the broker refuses for good
        self.fail_once: set[bytes] = set()  # values that fail transiently once
        self.fenced = False
        self.stopped = False

    async def start(self) -> None: ...

    async def stop(self) -> None:
        self.stopped = True

    async def begin_transaction(self) -> None:
        if self.fenced:
            raise ProducerFenced()
        assert self.open is None, "two transactions open at once"
        self.open, self.offsets = [], {}

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future[Any]:
        assert self.open is not None, "send outside a transaction"
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if value in self.refuse:
            future.set_exception(MessageSizeTooLargeError())
        elif value in self.fail_once:
            self.fail_once.discard(value)
            future.set_exception(KafkaTimeoutError())
        else:
            self.open.append((topic, value))
            future.set_result(None)
        return future

    async def send_offsets_to_transaction(self, offsets: dict[Any, int], group_id: str) -> None:
        assert self.open is not None
        self.offsets.update(offsets)

    async def commit_transaction(self) -> None:
        if self.fenced:
            raise ProducerFenced()
        assert self.open is not None
        self.visible += self.open
        self.committed_offsets.update(self.offsets)
        self.open = None

    async def abort_transaction(self) -> None:
        self.open = None


def _transactions() -> tuple[Transactions[TopicPartition], dict[str, FakeProducer]]:
    producers: dict[str, FakeProducer] = {}

    def factory(tid: str) -> FakeProducer:
        producers[tid] = FakeProducer(tid)
        return producers[tid]

    def dead_letter(origin: object, reason: str, error: str, dead: object) -> tuple[Record, object]:
        return Record("dlq", f"dead:{origin}:{reason}".encode()), None

    return Transactions(group_id="g", prefix="ctd", factory=factory, dead_letter=dead_letter), producers


def _stage(t: Transactions[TopicPartition], offset: int, *values: bytes, acked: list[int] | None = None) -> None:
    on_acked = None if acked is None else (lambda: acked.append(offset))
    assert t.stage(TP, offset, Staged(offset, [Record("verdicts", v) for v in values], on_acked, False))


async def test_a_commit_makes_the_prefix_outputs_and_its_offset_visible_together() -> None:
    t, producers = _transactions()
    await t.assign({TP})
    p = producers["ctd-g-conversations-0"]
    acked: list[int] = []
    for offset in range(4):
        _stage(t, offset, f"v{offset}".encode(), acked=acked)
    # Offsets 0-1 are the committable prefix (2 is still in flight somewhere): 3's output must wait.
    assert await t.commit(TP, 2) is Outcome.COMMITTED
    assert p.visible == [("verdicts", b"v0"), ("verdicts", b"v1")] and p.committed_offsets == {TP: 2}
    assert acked == [0, 1] and t.staged(TP) == 2
    assert await t.commit(TP, 4) is Outcome.COMMITTED
    assert [v for _, v in p.visible] == [b"v0", b"v1", b"v2", b"v3"] and p.committed_offsets == {TP: 4}


async def test_a_transient_failure_aborts_and_the_next_commit_sends_everything_again() -> None:
    t, producers = _transactions()
    await t.assign({TP})
    p = producers["ctd-g-conversations-0"]
    _stage(t, 0, b"a")
    _stage(t, 1, b"b")
    p.fail_once.add(b"b")
    assert await t.commit(TP, 2) is Outcome.RETRY
    assert p.visible == [] and p.committed_offsets == {}  # nothing of the aborted transaction, offset included
    assert await t.commit(TP, 2) is Outcome.COMMITTED
    assert [v for _, v in p.visible] == [b"a", b"b"] and p.committed_offsets == {TP: 2}


async def test_an_output_refused_for_good_is_dead_lettered_in_the_same_commit() -> None:
    t, producers = _transactions()
    await t.assign({TP})
    p = producers["ctd-g-conversations-0"]
    _stage(t, 0, b"ok")
    _stage(t, 1, b"huge")
    p.refuse.add(b"huge")
    assert await t.commit(TP, 2) is Outcome.COMMITTED
    assert p.visible == [("verdicts", b"ok"), ("dlq", b"dead:1:publish_refused")]
    assert p.committed_offsets == {TP: 2}


async def test_a_fenced_producer_drops_the_partition_and_commits_nothing() -> None:
    t, producers = _transactions()
    await t.assign({TP})
    p = producers["ctd-g-conversations-0"]
    _stage(t, 0, b"zombie")
    p.fenced = True  # another instance started a producer with this partition's transactional id
    assert await t.commit(TP, 1) is Outcome.FENCED
    assert p.visible == [] and p.stopped and not t.owns(TP)
    assert not t.stage(TP, 1, Staged(1, [], None, False)), "a fenced partition takes no more outputs"


async def test_copies_below_the_committed_offset_are_never_sent_again() -> None:
    t, producers = _transactions()
    await t.assign({TP})
    p = producers["ctd-g-conversations-0"]
    t.set_base(TP, 5)  # the committed offset read after assignment
    _stage(t, 3, b"old")  # a late copy of an offset an earlier owner committed
    _stage(t, 5, b"new")
    assert await t.commit(TP, 6) is Outcome.COMMITTED
    assert p.visible == [("verdicts", b"new")]


def test_transactional_ids_are_stable_per_group_and_input_partition() -> None:
    t, _ = _transactions()
    assert t.transactional_id(TopicPartition("conversations", 7)) == "ctd-g-conversations-7"
