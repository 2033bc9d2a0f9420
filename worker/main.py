"""Process entry points of the shipped service: the monitor worker and the guard (+ alerter), until signalled."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

from probes.conversation import single_turn
from probes.experts.base import Expert
from probes.experts.factory import build_expert
from probes.logs import get_logger
from probes.runtime.bundle import read_manifest
from probes.runtime.monitor import Monitor
from worker.alerts import AlertStream, alert_stream
from worker.config import GuardSettings, WorkerSettings
from worker.guard import GuardStream, guard_stream
from worker.health import HealthServer
from worker.metrics import AlerterMetrics, GuardMetrics
from worker.monitor import monitor_stream

log = get_logger(__name__)
S = TypeVar("S", WorkerSettings, GuardSettings)


def load_monitor(settings: WorkerSettings) -> Monitor:
    return Monitor(settings.worker.bundle, settings.model, cache_dir=settings.cache_dir)


def warm_up(monitor: Monitor, settings: WorkerSettings, passes: int = 2) -> float:
    """Run the largest batch the batcher can form a few times before joining the group.

    A fresh process runs its first forward passes much slower (allocator growth, lazy kernel and thread-pool
    set-up); without this the first real batches pay for it in latency while partitions are already ours.
    """
    # Through the serving path (the event's kept view first, then its windows): a conversation this long is also
    # read in windows, which builds the tokenizer's vocabulary table (~0.1 s) here, not in a first long event.
    ids = monitor.tokenize_windows(single_turn("warm up " * monitor.max_tokens))[0]
    b = settings.batching
    batch = monitor.collate([ids] * max(1, min(b.max_items, b.max_batch_tokens // len(ids))))
    started = time.monotonic()
    for _ in range(passes):
        monitor.score(batch)
    elapsed = time.monotonic() - started
    log.info("worker.warmed_up", seconds=round(elapsed, 3), batch=list(batch.input_ids.shape), passes=passes)
    return elapsed


#: Net new container objects between two young collections (CPython's default: 700). An event in flight holds
#: dozens (its record, decoded event, rows, envelope, verdict), so at 700 the collector ran every few events and,
#: through gen 1 and 2, re-walked everything in flight: ~20 µs of event-loop CPU per event (bench machinery).
#: Garbage that only a collection frees (cycles) waits at most this many allocations longer.
GC_YOUNG_THRESHOLD = 20_000


def settle_collector() -> None:
    """Once everything long-lived is loaded: the model, tokenizer and libraries (hundreds of thousands of objects)
    out of the collector's sight, so the full collections that per-event garbage triggers no longer walk them all,
    and young collections every ``GC_YOUNG_THRESHOLD`` net allocations rather than CPython's 700."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def run_worker(settings: WorkerSettings) -> None:
    """Load and warm the model (readiness stays false until partitions are assigned), then serve until signalled."""
    # Tokenization runs in the prep thread with the GIL released; the Rust pool's own threads would only
    # compete with the event loop for the same cores (and hide the cost from the stage timers).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    monitor = load_monitor(settings)
    warm_up(monitor, settings)
    worker = monitor_stream(settings, monitor)
    settle_collector()

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
        self.guard = guard_stream(settings, expert, self.guard_metrics, serve_http=False)
        self.alerter: AlertStream | None = None
        if settings.alerts.enabled:
            self.alerter = alert_stream(settings, AlerterMetrics(registry=self.guard_metrics.registry))
        self.health: HealthServer | None = None

    @property
    def services(self) -> list[GuardStream | AlertStream]:
        services: list[GuardStream | AlertStream] = [self.guard]
        if self.alerter is not None:
            services.append(self.alerter)
        return services

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


def run_responses(settings: WorkerSettings) -> None:
    """Serve the streamed-response topic (token probe, early stop) until signalled."""
    from worker.responses import refuse_exactly_once, response_stream

    refuse_exactly_once(settings)  # before loading the model: a configuration error says so at once
    monitor = Monitor(settings.responses.bundle, settings.model, cache_dir=settings.cache_dir)
    service = response_stream(settings, monitor)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        await service.run()

    asyncio.run(main())


def override(settings: S, *, section: str, bundle: Path | None = None, bootstrap: str | None = None) -> S:
    """``--bundle`` (into ``section``, e.g. ``worker`` or ``guard``) and ``--bootstrap`` over loaded settings."""
    updates: dict[str, Any] = {}
    if bundle is not None:
        updates[section] = getattr(settings, section).model_copy(update={"bundle": bundle})
    if bootstrap is not None:
        updates["kafka"] = settings.kafka.model_copy(update={"bootstrap_servers": bootstrap})
    return settings.model_copy(update=updates) if updates else settings
