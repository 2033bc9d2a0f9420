"""Dataset conversations as conversation events on the input topic (the demo's and benchmarks' producer)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from probes.data import Record, read_file
from worker.config import WorkerSettings
from worker.events import ChatMessage, ConversationEvent, utcnow


def record_event(record: Record, *, run_id: str, index: int) -> ConversationEvent:
    """A dataset record as a conversation event; the label travels in metadata for later scoring."""
    return ConversationEvent(
        event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{run_id}/{index}/{record.id}")),
        conversation_id=record.id,
        tenant=record.source,
        created_at=utcnow(),
        messages=[ChatMessage(role=m.role, content=m.content) for m in record.messages],
        metadata={"label": record.label, "source": record.source, "category": record.category, "run_id": run_id},
    )


async def replay(
    settings: WorkerSettings, files: Sequence[Path], *, rate: float | None, limit: int | None,
    run_id: str | None = None, progress: Callable[[int], None] | None = None,
) -> dict[str, object]:
    """Produce dataset conversations to the input topic at ``rate`` events/s (None = as fast as possible)."""
    records: list[Record] = []
    for path in files:
        records.extend(read_file(path))
    if limit is not None:
        records = records[:limit]
    result = await replay_records(settings, records, rate=rate, run_id=run_id, progress=progress)
    return {k: v for k, v in result.items() if k != "event_ids"}


async def replay_records(
    settings: WorkerSettings, records: Sequence[Record], *, rate: float | None, run_id: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Produce records as events; returns the run id, the event ids in order and the achieved rate."""
    run_id = run_id or uuid.uuid4().hex[:12]
    producer = AIOKafkaProducer(**settings.kafka.client_kwargs(), **settings.kafka.producer_kwargs())
    await producer.start()
    started = time.monotonic()
    ids: list[str] = []
    try:
        futures = []
        for index, record in enumerate(records):
            if rate:
                delay = started + index / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            event = record_event(record, run_id=run_id, index=index)
            ids.append(event.event_id)
            futures.append(await producer.send(settings.topics.input, event.to_json(),
                                               key=event.conversation_id.encode()))
            if progress is not None:
                progress(1)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    elapsed = time.monotonic() - started
    return {"run_id": run_id, "events": len(ids), "seconds": round(elapsed, 3),
            "rate": round(len(ids) / elapsed, 1) if elapsed > 0 else None, "topic": settings.topics.input,
            "event_ids": ids}
