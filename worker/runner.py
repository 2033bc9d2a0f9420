"""Process entry points: run the worker until SIGTERM/SIGINT, replay dataset conversations as events."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from probes.bundle import read_manifest
from probes.conversation import single_turn
from probes.data import Record, read_file
from probes.experts.base import Expert
from probes.experts.factory import build_expert
from probes.logs import get_logger
from probes.monitor import Monitor
from worker.alerts import Alerter
from worker.app import MonitorWorker
from worker.config import GuardSettings, WorkerSettings
from worker.events import ChatMessage, ConversationEvent, utcnow
from worker.guard import GuardService
from worker.health import HealthServer
from worker.metrics import AlerterMetrics, GuardMetrics

log = get_logger(__name__)


def load_monitor(settings: WorkerSettings) -> Monitor:
    return Monitor(settings.worker.bundle, settings.model, cache_dir=settings.cache_dir)


def warm_up(monitor: Monitor, settings: WorkerSettings, passes: int = 2) -> float:
    """Run the largest batch the batcher can form a few times before joining the group.

    A fresh process runs its first forward passes much slower (allocator growth, lazy kernel and thread-pool
    set-up); without this the first real batches pay for it in latency while partitions are already ours.
    """
    ids = monitor.tokenize(single_turn("warm up " * monitor.max_tokens))
    b = settings.batching
    batch = monitor.collate([ids] * max(1, min(b.max_items, b.max_batch_tokens // len(ids))))
    started = time.monotonic()
    for _ in range(passes):
        monitor.score(batch)
    elapsed = time.monotonic() - started
    log.info("worker.warmed_up", seconds=round(elapsed, 3), batch=list(batch.input_ids.shape), passes=passes)
    return elapsed


def run_worker(settings: WorkerSettings) -> None:
    """Load and warm the model (readiness stays false until partitions are assigned), then serve until signalled."""
    # Tokenization runs in the prep thread with the GIL released; the Rust pool's own threads would only
    # compete with the event loop for the same cores (and hide the cost from the stage timers).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    monitor = load_monitor(settings)
    warm_up(monitor, settings)
    worker = MonitorWorker(settings, monitor)
    # The model, tokenizer and libraries are hundreds of thousands of long-lived objects: out of the collector's
    # sight, the full collections that per-event garbage triggers no longer walk them all.
    gc.freeze()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    asyncio.run(main())
    if worker.tracker.in_flight():
        # The drain gave up on a batch still inside torch. Interpreter exit would join that thread and
        # overrun the shutdown deadline (the pod gets SIGKILLed anyway); its offsets were never committed,
        # so the partitions' next owner redoes them.
        log.warning("worker.exit_abandoning", in_flight=worker.tracker.in_flight())
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def load_expert(settings: GuardSettings) -> Expert:
    bundle = settings.guard.bundle
    manifest = read_manifest(bundle) if bundle is not None else None
    return build_expert(settings, bundle_manifest=manifest)


class GuardProcess:
    """The guard service and (when enabled) the alerter in one process, behind one health/metrics server."""

    def __init__(self, settings: GuardSettings, expert: Expert) -> None:
        self.settings = settings
        self.guard_metrics = GuardMetrics()
        self.guard = GuardService(settings, expert, self.guard_metrics, serve_http=False)
        self.alerter: Alerter | None = None
        if settings.alerts.enabled:
            self.alerter = Alerter(settings, AlerterMetrics(registry=self.guard_metrics.registry))
        self.health: HealthServer | None = None

    @property
    def services(self) -> list[GuardService | Alerter]:
        return [self.guard] + ([self.alerter] if self.alerter is not None else [])

    def ready(self) -> bool:
        return all(s.ready() for s in self.services)

    def live(self) -> tuple[bool, str]:
        states = [s.live() for s in self.services]
        return all(ok for ok, _ in states), "; ".join(why for _, why in states)

    def stop(self) -> None:
        for service in self.services:
            service.stop()

    async def run(self) -> None:
        g = self.settings.guard
        self.health = HealthServer(host=g.http_host, port=g.http_port, registry=self.guard_metrics.registry,
                                   ready=self.ready, live=self.live)
        await self.health.start()
        try:
            runs = [asyncio.create_task(s.run(), name=s.name) for s in self.services]
            await asyncio.wait(runs, return_when=asyncio.FIRST_COMPLETED)
            self.stop()  # one service ending (signal or crash) ends the process: the supervisor restarts it
            results = await asyncio.gather(*runs, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
        finally:
            await self.health.stop()


def run_guard(settings: GuardSettings) -> None:
    """Load the expert, then serve review requests (and alerts) until signalled."""
    expert = load_expert(settings)

    async def main() -> None:
        process = GuardProcess(settings, expert)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, process.stop)
        await process.run()

    asyncio.run(main())


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
    producer = AIOKafkaProducer(**settings.kafka.client_kwargs(), acks="all", enable_idempotence=True, linger_ms=5)
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
