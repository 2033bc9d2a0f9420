"""``bench soak``: N events at a fixed rate through the worker (child process) and a real broker.

Every ``interval_s`` the worker's RSS is sampled and the verdicts received in that interval give the
latency percentiles: end to end (event created → verdict read back) and in the worker (fetch →
decision). RSS growth compares the last interval with the first, so model loading and allocator
warm-up, which happen before traffic starts, do not count as growth.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from ctd_monitor.bench.pipeline import bench_topics
from ctd_monitor.local.broker import LocalBroker
from ctd_monitor.local.child import WorkerProcess, write_worker_config
from ctd_monitor.local.replay import record_event
from probes.data import read_file
from worker.config import WorkerSettings

RSS_TARGET_PCT = 5.0


async def _produce(settings: WorkerSettings, files: Sequence[Path], n: int, rate: float,
                   sent: dict[str, float]) -> float:
    """``n`` events at ``rate``/s, cycling through the files' conversations (each event a new id);
    ``sent`` gets each event id's send time."""
    records = [r for path in files for r in read_file(path)]
    producer = AIOKafkaProducer(**settings.kafka.client_kwargs(), **settings.kafka.producer_kwargs())
    await producer.start()
    started = time.monotonic()
    try:
        futures = []
        for index, record in zip(range(n), itertools.cycle(records), strict=False):
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            event = record_event(record, run_id="soak", index=index)
            sent[event.event_id] = time.time()
            futures.append(await producer.send(settings.topics.input, event.to_json(),
                                               key=event.conversation_id.encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.monotonic() - started


class _Collector:
    """Reads verdicts as they arrive and stamps each with the time it was read."""

    def __init__(self, settings: WorkerSettings, sent: dict[str, float]) -> None:
        self.settings = settings
        self.sent = sent
        self.seen: set[str] = set()
        self.rows: list[tuple[float, float, float]] = []  # (read at, end-to-end s, worker total s)

    async def run(self, n: int) -> None:
        consumer = AIOKafkaConsumer(self.settings.topics.verdicts, bootstrap_servers=self.settings.kafka.bootstrap_servers,
                                    auto_offset_reset="earliest", group_id=None,
                                    isolation_level="read_committed")
        await consumer.start()
        try:
            while len(self.seen) < n:
                for records in (await consumer.getmany(timeout_ms=100)).values():
                    now = time.time()
                    for r in records:
                        v = orjson.loads(r.value)
                        if v["event_id"] in self.seen:
                            continue
                        self.seen.add(v["event_id"])
                        self.rows.append((now, now - self.sent.get(v["event_id"], now),
                                          v["timings"]["total_ms"] / 1000.0))
        finally:
            await consumer.stop()


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None}
    arr = 1000.0 * np.asarray(values)
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99))}


async def soak(settings: WorkerSettings, files: Sequence[Path], n: int, rate: float, interval_s: float,
               workdir: Path) -> dict[str, Any]:
    config = write_worker_config(workdir / "worker.yaml", settings)
    with WorkerProcess(config, workdir / "worker.log") as proc:
        while not proc.logged('"worker.started"'):
            await asyncio.sleep(0.1)
        sent: dict[str, float] = {}
        collector = _Collector(settings, sent)
        collecting = asyncio.create_task(collector.run(n))
        producing = asyncio.create_task(_produce(settings, files, n, rate, sent))
        started = time.time()
        samples: list[tuple[float, int]] = [(started, proc.rss_bytes())]
        timeout = n / rate + 120.0
        while not collecting.done():
            await asyncio.wait({collecting}, timeout=interval_s)
            samples.append((time.time(), proc.rss_bytes()))
            if time.time() - started > timeout:
                collecting.cancel()
                break
        produce_seconds = await producing
        code = proc.terminate(settings.worker.shutdown_deadline_s + 10)
    intervals: list[dict[str, Any]] = []
    for (t0, _), (t1, rss) in itertools.pairwise(samples):
        rows = [r for r in collector.rows if t0 <= r[0] < t1]
        intervals.append({
            "t_s": round(t1 - started, 2), "rss_mb": rss / 2**20, "verdicts": len(rows),
            "e2e": _percentiles([r[1] for r in rows]), "worker": _percentiles([r[2] for r in rows]),
        })
    first, last = samples[1][1] / 2**20, samples[-1][1] / 2**20
    growth = 100.0 * (last - first) / first
    return {
        "n": n, "rate": rate, "interval_s": interval_s, "verdicts": len(collector.seen),
        "produce_seconds": produce_seconds, "worker_exit_code": code,
        "rss_start_mb": samples[0][1] / 2**20, "rss_first_interval_mb": first, "rss_last_interval_mb": last,
        "rss_max_mb": max(s[1] for s in samples) / 2**20, "rss_growth_pct": growth,
        "rss_target_pct": RSS_TARGET_PCT, "rss_target_met": growth <= RSS_TARGET_PCT,
        "e2e": _percentiles([r[1] for r in collector.rows]), "worker": _percentiles([r[2] for r in collector.rows]),
        "intervals": intervals,
    }


def bench_soak(settings: WorkerSettings, files: Sequence[Path], n: int, rate: float, interval_s: float = 10.0,
               broker: LocalBroker | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, bench_topics(settings, Path(tmp), broker) as s:
        return asyncio.run(soak(s, files, n, rate, interval_s, Path(tmp)))
