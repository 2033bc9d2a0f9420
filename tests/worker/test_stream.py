"""The stream core alone, against an in-memory consumer and producer (no broker): acks, commits, rebalance.

The fakes implement only what ``worker.stream`` calls on ``AIOKafkaConsumer`` / ``AIOKafkaProducer``; the
broker tests (test_worker_kafka, test_guard_kafka, test_reliability) cover the same paths end to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from worker.config import KafkaConfig
from worker.metrics import ConsumerMetrics
from worker.publish import RetryPolicy
from worker.stream import Envelope, Message, Outputs, ServiceLimits, Stream, split_on_failure

TOPIC = "in"
P0 = TopicPartition(TOPIC, 0)
P1 = TopicPartition(TOPIC, 1)


def record(tp: TopicPartition, offset: int, value: bytes = b"x") -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic=tp.topic, partition=tp.partition, offset=offset, timestamp=0, timestamp_type=0,
                          key=None, value=value, checksum=None, serialized_key_size=0,
                          serialized_value_size=len(value), headers=())


class FakeConsumer:
    """Partitions as lists of records; ``getmany`` hands out what is unfetched on unpaused partitions."""

    def __init__(self, records: dict[TopicPartition, int]) -> None:
        self.log = {tp: [record(tp, o) for o in range(n)] for tp, n in records.items()}
        self.position = {tp: 0 for tp in records}
        self.assigned: set[TopicPartition] = set()
        self.paused: set[TopicPartition] = set()
        self.commits: list[dict[TopicPartition, int]] = []
        self.listener: ConsumerRebalanceListener | None = None

    def subscribe(self, topics: list[str], listener: ConsumerRebalanceListener) -> None:
        self.listener = listener

    async def start(self) -> None:
        self.assigned = set(self.log)
        assert self.listener is not None
        await self.listener.on_partitions_assigned(set(self.assigned))

    async def stop(self) -> None:
        pass

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        out: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        budget = max_records or 1 << 30
        for tp in sorted(self.assigned - self.paused):
            taken = self.log[tp][self.position[tp]:self.position[tp] + budget]
            if taken:
                out[tp] = taken
                self.position[tp] += len(taken)
                budget -= len(taken)
        if not out:
            await asyncio.sleep(min(timeout_ms, 10) / 1000)
        return out

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused |= set(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused -= set(partitions)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))

    def highwater(self, partition: TopicPartition) -> int | None:
        return len(self.log[partition])

    async def committed(self, partition: TopicPartition) -> int | None:
        return self.last_commit(partition)

    def last_commit(self, tp: TopicPartition) -> int | None:
        return next((c[tp] for c in reversed(self.commits) if tp in c), None)

    async def revoke(self, partitions: set[TopicPartition]) -> None:
        assert self.listener is not None
        await self.listener.on_partitions_revoked(set(partitions))
        self.assigned -= partitions


class FakeProducer:
    """``send`` returns the broker-ack future; tests resolve (or fail) it when they like."""

    def __init__(self, auto_ack: bool = False) -> None:
        self.auto_ack = auto_ack
        self.sent: list[tuple[str, bytes, asyncio.Future[None]]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future[Any]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.auto_ack:
            future.set_result(None)
        self.sent.append((topic, value, future))
        return future


class EchoHandler:
    """Publishes one output per record, right away; the producer decides when it is acknowledged."""

    name = "test"

    def __init__(self, publish: bool = True) -> None:
        self.publish = publish
        self.accepted: list[Envelope[bytes]] = []
        self.outputs: Outputs | None = None

    async def start(self, outputs: Outputs) -> None:
        self.outputs = outputs

    async def accept(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        assert self.outputs is not None
        for r in records:
            item = Envelope.of(r, r.value or b"", 0.0)
            self.accepted.append(item)
            if self.publish:
                self.outputs.publish(item, [Message("out", item.value, None)])

    async def run(self) -> None:
        return  # nothing of its own to do: the stream keeps serving

    def busy(self) -> bool:
        return False

    def waiting_on_purpose(self) -> bool:
        return False

    def wake(self) -> None:
        pass

    async def close(self) -> None:
        pass


def make_stream(handler: EchoHandler, consumer: FakeConsumer, producer: FakeProducer, *, max_in_flight: int = 100,
                shutdown_deadline_s: float = 1.0) -> Stream[EchoHandler]:
    limits = ServiceLimits(max_in_flight=max_in_flight, max_event_bytes=1 << 20, shutdown_deadline_s=shutdown_deadline_s,
                           commit_interval_s=0.01, liveness_max_stall_s=60, http_port=None)
    return Stream(handler, kafka=KafkaConfig(), group_id="g", topic=TOPIC, dead_letter_topic="dlq", limits=limits,
                  metrics=ConsumerMetrics(), consumer=consumer, producer=producer)


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def running(stream: Stream[EchoHandler]) -> asyncio.Task[None]:
    task = asyncio.create_task(stream.run())
    await until(stream.ready)
    return task


async def running_with_fast_retries(handler: EchoHandler, *, events: int) -> tuple[
        Stream[EchoHandler], asyncio.Task[None], FakeConsumer, FakeProducer]:
    """A running stream over ``events`` records of P0 whose publish retries back off for milliseconds."""
    consumer, producer = FakeConsumer({P0: events}), FakeProducer()
    stream = make_stream(handler, consumer, producer)
    task = await running(stream)
    assert stream.outputs is not None
    stream.outputs.retry = RetryPolicy(backoff_s=0.01, backoff_max_s=0.02)
    return stream, task, consumer, producer


async def stopped(stream: Stream[Any], task: asyncio.Task[None]) -> None:
    stream.stop()
    await asyncio.wait_for(task, 30)


async def test_out_of_order_acks_commit_only_the_contiguous_prefix() -> None:
    consumer, producer = FakeConsumer({P0: 4}), FakeProducer()
    stream = make_stream(EchoHandler(), consumer, producer)
    task = await running(stream)
    await until(lambda: len(producer.sent) == 4)
    futures = [f for _, _, f in producer.sent]
    futures[2].set_result(None)
    futures[3].set_result(None)
    await asyncio.sleep(0.1)  # several commit intervals
    assert (consumer.last_commit(P0) or 0) == 0, "offsets 2 and 3 are done but 0 and 1 are not"
    futures[0].set_result(None)
    await until(lambda: consumer.last_commit(P0) == 1)
    futures[1].set_result(None)
    await until(lambda: consumer.last_commit(P0) == 4)  # the gap closed: one past the last offset
    assert stream.tracker.in_flight() == 0
    await stopped(stream, task)


async def test_revoke_mid_batch_commits_what_is_done_and_forgets_the_rest() -> None:
    consumer, producer = FakeConsumer({P0: 4, P1: 2}), FakeProducer()
    stream = make_stream(EchoHandler(), consumer, producer, shutdown_deadline_s=0.2)
    task = await running(stream)
    await until(lambda: len(producer.sent) == 6)
    p0 = [f for (_, _, f), item in zip(producer.sent, stream.handler.accepted, strict=True) if item.tp == P0]
    for future in p0[:2]:
        future.set_result(None)
    await consumer.revoke({P0})  # offsets 2 and 3 never finish within the revoke deadline
    assert consumer.last_commit(P0) == 2
    assert stream.tracker.in_flight(P0) == 0, "the revoked partition's in-flight offsets are forgotten"
    assert stream.tracker.in_flight(P1) == 2, "the kept partition is untouched"
    commits_before = len([c for c in consumer.commits if P0 in c])
    p0[2].set_result(None)  # a late ack for a partition we no longer own must not be committed
    p0[3].set_result(None)
    await asyncio.sleep(0.1)
    assert len([c for c in consumer.commits if P0 in c]) == commits_before
    assert stream.ready(), "still serving the partition it kept"
    await stopped(stream, task)


async def test_publish_failure_leaves_the_offset_uncommitted() -> None:
    consumer, producer = FakeConsumer({P0: 3}), FakeProducer()
    stream = make_stream(EchoHandler(), consumer, producer)
    task = await running(stream)
    await until(lambda: len(producer.sent) == 3)
    futures = [f for _, _, f in producer.sent]
    futures[0].set_result(None)
    futures[1].set_exception(RuntimeError("broker said no"))
    futures[2].set_result(None)
    await until(lambda: consumer.last_commit(P0) == 1)
    await asyncio.sleep(0.1)
    assert consumer.last_commit(P0) == 1, "nothing past the failed output is ever committed"
    assert stream.tracker.in_flight(P0) == 2
    assert stream.metrics.publish_errors._value.get() == 1
    await stopped(stream, task)
    assert consumer.last_commit(P0) == 1, "not even on shutdown"


async def test_fetching_pauses_at_max_in_flight_and_resumes_when_work_finishes() -> None:
    consumer, producer = FakeConsumer({P0: 10}), FakeProducer()
    handler = EchoHandler(publish=False)
    stream = make_stream(handler, consumer, producer, max_in_flight=4)
    task = await running(stream)
    await until(lambda: consumer.paused == {P0})
    await asyncio.sleep(0.05)
    assert len(handler.accepted) == 4, "no fetch past the limit while paused"
    assert stream.metrics.paused._value.get() == 1
    assert stream.outputs is not None
    for item in handler.accepted[:4]:
        stream.outputs.done(item)
    await until(lambda: len(handler.accepted) == 8)
    for item in handler.accepted[4:]:
        stream.outputs.done(item)
    await until(lambda: len(handler.accepted) == 10 and not consumer.paused)
    for item in handler.accepted[8:]:
        stream.outputs.done(item)
    await until(lambda: consumer.last_commit(P0) == 10)
    await stopped(stream, task)


async def test_dead_letters_carry_the_original_bytes_and_complete_the_offset() -> None:
    consumer, producer = FakeConsumer({P0: 1}), FakeProducer(auto_ack=True)
    handler = EchoHandler(publish=False)
    stream = make_stream(handler, consumer, producer)
    task = await running(stream)
    await until(lambda: len(handler.accepted) == 1)
    assert stream.outputs is not None
    stream.outputs.dead_letter(handler.accepted[0], "inference_error", "boom", "inference")
    await until(lambda: consumer.last_commit(P0) == 1)
    topic, value, _ = producer.sent[0]
    assert topic == "dlq" and b'"reason":"inference_error"' in value and b'"stage":"inference"' in value
    await stopped(stream, task)


async def test_a_crashed_work_loop_stops_the_stream_with_an_error() -> None:
    class Crashing(EchoHandler):
        async def run(self) -> None:
            await asyncio.sleep(0.05)
            raise RuntimeError("work loop bug")

    consumer, producer = FakeConsumer({P0: 1}), FakeProducer(auto_ack=True)
    stream = make_stream(Crashing(), consumer, producer)
    with pytest.raises(RuntimeError, match="loop crashed"):
        await asyncio.wait_for(stream.run(), 30)


async def test_split_on_failure_dead_letters_only_the_item_that_still_fails() -> None:
    attempts: list[list[int]] = []
    given_up: list[int] = []
    done: list[int] = []

    async def attempt(batch: list[int]) -> None:
        attempts.append(batch)
        if 5 in batch:
            raise MemoryError("poisoned")
        done.extend(batch)

    def give_up(item: int, exc: Exception) -> None:
        given_up.append(item)

    await split_on_failure(list(range(8)), attempt, give_up, what="test")
    assert given_up == [5]
    assert sorted(done) == [0, 1, 2, 3, 4, 6, 7]
    assert attempts[0] == list(range(8)) and [5] in attempts



def test_limits_come_from_the_shared_service_settings_under_their_old_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from probes.config import load_settings
    from worker.config import GuardSettings, WorkerSettings

    monkeypatch.setenv("CTD_GUARD__MAX_IN_FLIGHT", "7")
    monkeypatch.setenv("CTD_WORKER__SHUTDOWN_DEADLINE_S", "3.5")
    guard = load_settings(cls=GuardSettings).guard
    worker = load_settings(cls=WorkerSettings).worker
    assert (guard.max_in_flight, guard.http_port, worker.max_in_flight, worker.http_port) == (7, 8081, 2048, 8080)
    limits = ServiceLimits.from_config(worker, max_event_bytes=worker.max_event_bytes)
    assert (limits.shutdown_deadline_s, limits.max_in_flight, limits.http_port) == (3.5, 2048, 8080)
    quiet = ServiceLimits.from_config(guard, max_event_bytes=1, serve_http=False, max_in_flight=99)
    assert (quiet.max_in_flight, quiet.http_port, quiet.commit_interval_s) == (99, None, guard.commit_interval_s)


async def test_a_transient_publish_failure_is_retried_until_acknowledged() -> None:
    """A broker outage used to leave the offset in flight for good; now the output is sent again."""
    from aiokafka.errors import KafkaTimeoutError

    stream, task, consumer, producer = await running_with_fast_retries(EchoHandler(), events=2)
    await until(lambda: len(producer.sent) == 2)
    producer.sent[0][2].set_result(None)
    producer.sent[1][2].set_exception(KafkaTimeoutError())
    await until(lambda: len(producer.sent) == 3)  # the same output, sent again
    assert producer.sent[2][1] == producer.sent[1][1]
    producer.sent[2][2].set_result(None)
    await until(lambda: consumer.last_commit(P0) == 2)
    assert stream.metrics.publish_retries._value.get() == 1 and stream.metrics.publish_errors._value.get() == 0
    await stopped(stream, task)


class BatchEchoHandler(EchoHandler):
    """Publishes a fetched batch's outputs with one ``publish_many`` call, as the monitor does."""

    acked: list[int]

    async def accept(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        assert self.outputs is not None
        items = [Envelope.of(r, r.value or b"", 0.0) for r in records]
        self.accepted.extend(items)
        self.acked = []
        self.outputs.publish_many([(item, [Message("out", item.value, None)],
                                    lambda offset=item.offset: self.acked.append(offset)) for item in items])


async def test_one_entrys_publish_retry_never_holds_up_the_rest_of_its_batch() -> None:
    """Entries of one ``publish_many`` were finished in order: while the first one's output was being retried,
    the later ones' acknowledged offsets were not marked done (and their verdict metrics not counted)."""
    from aiokafka.errors import KafkaTimeoutError

    stream, task, consumer, producer = await running_with_fast_retries(BatchEchoHandler(), events=3)
    await until(lambda: len(producer.sent) == 3)
    assert len(stream.handler.accepted) == 3, "one fetch, one publish_many"
    producer.sent[0][2].set_exception(KafkaTimeoutError())
    producer.sent[1][2].set_result(None)
    producer.sent[2][2].set_result(None)
    await until(lambda: len(producer.sent) == 4)  # offset 0's output, sent again and not yet acknowledged
    await until(lambda: stream.handler.acked == [1, 2])  # offsets 1 and 2 are done meanwhile
    await asyncio.sleep(0.05)
    assert (consumer.last_commit(P0) or 0) == 0, "at-least-once: nothing past the unacknowledged offset 0"
    producer.sent[3][2].set_result(None)
    await until(lambda: consumer.last_commit(P0) == 3)
    assert stream.handler.acked == [1, 2, 0]
    await stopped(stream, task)


async def test_an_output_the_broker_refuses_for_good_dead_letters_its_input() -> None:
    from aiokafka.errors import MessageSizeTooLargeError

    consumer, producer = FakeConsumer({P0: 1}), FakeProducer()
    stream = make_stream(EchoHandler(), consumer, producer)
    task = await running(stream)
    await until(lambda: len(producer.sent) == 1)
    producer.sent[0][2].set_exception(MessageSizeTooLargeError())
    await until(lambda: len(producer.sent) == 2)
    topic, body, future = producer.sent[1]
    assert topic == "dlq" and orjson.loads(body)["stage"] == "publish"
    future.set_result(None)
    await until(lambda: consumer.last_commit(P0) == 1)
    await stopped(stream, task)


async def test_paused_fetching_keeps_polling_so_the_group_membership_stays() -> None:
    """aiokafka leaves the group when getmany is not called for max_poll_interval_ms: back-pressure must pause
    partitions and keep polling, not stop polling."""
    consumer, producer = FakeConsumer({P0: 10}), FakeProducer()
    calls = 0
    getmany = consumer.getmany

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await getmany(*args, **kwargs)

    consumer.getmany = counting  # type: ignore[method-assign]
    stream = make_stream(EchoHandler(publish=False), consumer, producer, max_in_flight=4)
    task = await running(stream)
    await until(lambda: stream.tracker.in_flight() >= 4 and bool(consumer.paused))
    before = calls
    await asyncio.sleep(0.3)
    assert calls > before + 3, "still polling while paused"
    assert stream.tracker.in_flight() == 4 or stream.tracker.in_flight() <= 8
    await stopped(stream, task)


async def test_a_revoke_lets_the_handler_prune_queued_work_of_those_partitions() -> None:
    from worker.config import GuardSettings
    from worker.guard import GuardHandler
    from worker.metrics import GuardMetrics

    class Recording(EchoHandler):
        def __init__(self) -> None:
            super().__init__(publish=False)
            self.pruned: list[set[TopicPartition]] = []

        def revoked(self, partitions: set[TopicPartition]) -> None:
            self.pruned.append(partitions)

    consumer, producer = FakeConsumer({P0: 2, P1: 2}), FakeProducer()
    handler = Recording()
    stream = make_stream(handler, consumer, producer, shutdown_deadline_s=0.1)
    task = await running(stream)
    await until(lambda: len(handler.accepted) == 4)
    await consumer.revoke({P1})
    assert handler.pruned == [{P1}]
    await stopped(stream, task)

    import types

    stub = types.SimpleNamespace(name="stub-expert")
    guard = GuardHandler(GuardSettings(), expert=stub, metrics=GuardMetrics())  # type: ignore[arg-type]
    guard._pending.extend(Envelope.of(record(tp, o), None, 0.0) for tp in (P0, P1) for o in range(3))  # type: ignore[arg-type]
    guard.revoked({P1})
    assert {e.tp for e in guard._pending} == {P0} and len(guard._pending) == 3


async def test_a_dead_letter_the_topic_refuses_is_sent_again_small() -> None:
    from aiokafka.errors import MessageSizeTooLargeError

    class Poison(EchoHandler):
        async def accept(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
            assert self.outputs is not None
            for r in records:
                self.outputs.dead_letter(Envelope.of(r, b"", 0.0), "oversize", "too big", "decode")

    consumer, producer = FakeConsumer({P0: 1}), FakeProducer()
    consumer.log[P0] = [record(P0, 0, b"z" * 50_000)]
    stream = make_stream(Poison(), consumer, producer)
    task = await running(stream)
    await until(lambda: len(producer.sent) == 1)
    producer.sent[0][2].set_exception(MessageSizeTooLargeError())
    await until(lambda: len(producer.sent) == 2)
    topic, body, future = producer.sent[1]
    letter = orjson.loads(body)
    assert topic == "dlq" and len(body) <= 8192 and letter["truncated"] and letter["value_bytes"] == 50_000
    future.set_result(None)
    await until(lambda: consumer.last_commit(P0) == 1)
    await stopped(stream, task)


async def test_a_partition_gone_before_its_revoke_callback_does_not_crash_the_commit_loop() -> None:
    class Strict(FakeConsumer):
        """aiokafka's ``highwater`` asserts on a partition the consumer no longer holds."""

        def highwater(self, partition: TopicPartition) -> int | None:
            assert partition in self.assigned, "Partition is not assigned"
            return super().highwater(partition)

    kept, gone = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
    consumer, producer = Strict({kept: 3, gone: 3}), FakeProducer()
    stream = make_stream(EchoHandler(), consumer, producer)
    task = await running(stream)
    consumer.assigned.discard(gone)  # the group took it; the revoke callback has not run yet
    await asyncio.sleep(0.3)  # many commit intervals, each updating the lag gauges
    assert not task.done()
    # the partition still held keeps its gauge
    lag = stream.metrics.consumer_lag.labels(topic=TOPIC, partition="0")._value.get()
    assert lag == 3 - (stream.tracker.position(kept) or consumer.last_commit(kept) or 0)
    await stopped(stream, task)
