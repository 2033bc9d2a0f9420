"""Publishing that outlasts a broker outage: retried with capped exponential backoff until acknowledged.

A send that fails (broker down, leader moving, request timed out) used to leave its offset in flight for good:
nothing past it was committed again until a restart. Every output is now retried until the broker acknowledges
it, so an outage of minutes ends with every event answered and no restart. Only errors that no retry can fix
(the record is too large for the topic, it is not authorised) are raised to the caller, which dead-letters the
event instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    UnsupportedVersionError,
)

from probes.logs import get_logger

log = get_logger(__name__)

# Retrying cannot fix these: the same record is refused again.
PERMANENT: tuple[type[BaseException], ...] = (
    MessageSizeTooLargeError, RecordListTooLargeError, TopicAuthorizationFailedError, InvalidTopicError,
    UnsupportedVersionError, TypeError, ValueError,
)


# Worth retrying: the broker is down or moving, or the request timed out.
TRANSIENT: tuple[type[BaseException], ...] = (KafkaError, OSError, TimeoutError)


class Producer(Protocol):
    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> Any: ...


@dataclass(frozen=True)
class Record:
    topic: str
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class RetryPolicy:
    backoff_s: float = 0.2
    backoff_max_s: float = 10.0


async def send_acknowledged(
    producer: Producer, record: Record, *, policy: RetryPolicy = RetryPolicy(),
    on_retry: Callable[[BaseException], None] | None = None, stopping: asyncio.Event | None = None,
) -> None:
    """Send ``record`` and wait for the broker's ack, retrying transient failures until it comes.

    ``stopping`` set: give up after the current attempt (a shutdown leaves the offset uncommitted, so the
    record is re-read by whoever owns the partition next; nothing is lost).
    """
    delay = policy.backoff_s
    while True:
        try:
            future = await producer.send(record.topic, record.value, key=record.key, headers=list(record.headers))
            await future
            return
        except PERMANENT:
            raise
        except TRANSIENT as exc:
            if stopping is not None and stopping.is_set():
                raise
            if on_retry is not None:
                on_retry(exc)
            log.warning("publish.retry", topic=record.topic, error=type(exc).__name__, wait_s=round(delay, 2))
            await asyncio.sleep(delay)
            delay = min(policy.backoff_max_s, delay * 2)


async def send_all_acknowledged(
    producer: Producer, records: Sequence[Record], *, policy: RetryPolicy = RetryPolicy(),
    on_retry: Callable[[BaseException], None] | None = None, stopping: asyncio.Event | None = None,
) -> None:
    """Every record acknowledged (each retried on its own), or the first permanent error."""
    await asyncio.gather(*(send_acknowledged(producer, r, policy=policy, on_retry=on_retry, stopping=stopping)
                           for r in records))
