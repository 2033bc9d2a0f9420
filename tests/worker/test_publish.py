"""Outputs are retried until acknowledged (worker/publish.py): in-memory producer, then the real broker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError, NotLeaderForPartitionError

from ctd_monitor.local.broker import LocalBroker
from worker.publish import Record, RetryPolicy, send_acknowledged, send_all_acknowledged

FAST = RetryPolicy(backoff_s=0.001, backoff_max_s=0.004)


class FlakyProducer:
    """Fails the first ``failures`` sends (at send time or at ack time), then acknowledges."""

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = list(failures)
        self.sent: list[Record] = []

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   headers: Any = None) -> Any:
        if self.failures:
            exc = self.failures.pop(0)
            if isinstance(exc, KafkaTimeoutError):
                raise exc  # refused before it is queued
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_exception(exc)  # queued, then the broker said no
            return future
        self.sent.append(Record(topic, value or b"", key, tuple(headers or ())))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_transient_failures_are_retried_until_acknowledged() -> None:
    producer = FlakyProducer([KafkaTimeoutError(), NotLeaderForPartitionError(), KafkaTimeoutError()])
    retries: list[str] = []
    await send_acknowledged(producer, Record("t", b"v", b"k", (("h", b"1"),)), policy=FAST,
                            on_retry=lambda exc: retries.append(type(exc).__name__))
    assert retries == ["KafkaTimeoutError", "NotLeaderForPartitionError", "KafkaTimeoutError"]
    assert producer.sent == [Record("t", b"v", b"k", (("h", b"1"),))]


async def test_a_permanent_error_is_raised_at_once() -> None:
    producer = FlakyProducer([MessageSizeTooLargeError()])
    with pytest.raises(MessageSizeTooLargeError):
        await send_all_acknowledged(producer, [Record("t", b"v")], policy=FAST)


async def test_stopping_gives_up_instead_of_retrying() -> None:
    stopping = asyncio.Event()
    stopping.set()
    with pytest.raises(KafkaTimeoutError):
        await send_acknowledged(FlakyProducer([KafkaTimeoutError()]), Record("t", b"v"), policy=FAST,
                                stopping=stopping)


async def test_a_frozen_broker_delays_but_does_not_lose_the_record(
    kafka_broker: LocalBroker, kafka_topics: Any
) -> None:
    """The real broker frozen (SIGSTOP) for longer than the producer's request timeout: the send waits (in
    aiokafka's own retries or ours, whichever fails first) and is acknowledged once the broker is back."""
    [topic] = kafka_topics(1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all", request_timeout_ms=2000,
                                enable_idempotence=True)
    await producer.start()
    retries: list[BaseException] = []
    try:
        kafka_broker.pause()
        try:
            task = asyncio.create_task(send_acknowledged(
                producer, Record(topic, b"hello"), policy=RetryPolicy(0.2, 1.0), on_retry=retries.append))
            await asyncio.sleep(5)
            assert not task.done()
        finally:
            kafka_broker.resume()
        await asyncio.wait_for(task, timeout=60)
    finally:
        await producer.stop()
    assert all(not isinstance(exc, MessageSizeTooLargeError) for exc in retries)
