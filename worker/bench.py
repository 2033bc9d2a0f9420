"""Benchmarks that print JSON: the worker's end-to-end rate through a real broker versus a bare forward loop.

Both sides use the same texts, the same truncated model and the same token-budget batches, so
``efficiency`` isolates what the streaming machinery costs.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from aiokafka import AIOKafkaConsumer

from probes.batching import plan_batches
from probes.data import read_file
from probes.monitor import Monitor
from worker.app import MonitorWorker
from worker.broker import LocalBroker
from worker.config import TopicsConfig, WorkerSettings
from worker.runner import replay


def raw_forward_rate(monitor: Monitor, conversations: Sequence[Any], settings: WorkerSettings) -> dict[str, float]:
    """Events/s of a bare loop over pre-tokenized, pre-collated batches (forward pass + pooling only)."""
    ids = [monitor.tokenize(c) for c in conversations]
    b = settings.batching
    plan = plan_batches([len(x) for x in ids], batch_tokens=b.max_batch_tokens, max_items=b.max_items)
    batches = [monitor.collate([ids[i] for i in batch]) for batch in plan]
    monitor.features(batches[0])  # warm-up
    started = time.perf_counter()
    for batch in batches:
        monitor.features(batch)
    elapsed = time.perf_counter() - started
    tokens = sum(len(x) for x in ids)
    return {"raw_forward_eps": len(ids) / elapsed, "raw_seconds": elapsed, "tokens": float(tokens),
            "batches": float(len(batches))}


async def _collect_verdicts(bootstrap: str, topic: str, n: int, timeout: float) -> tuple[list[dict[str, Any]], float]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < n and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=100)).values():
                for r in records:
                    v = orjson.loads(r.value)
                    seen.setdefault(v["event_id"], v)
    finally:
        await consumer.stop()
    return list(seen.values()), time.monotonic()


async def pipeline_rate(monitor: Monitor, settings: WorkerSettings, files: Sequence[Path], n: int) -> dict[str, Any]:
    worker = MonitorWorker(settings, monitor)
    task = asyncio.create_task(worker.run())
    while not worker.ready():
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    collector = asyncio.create_task(_collect_verdicts(settings.kafka.bootstrap_servers, settings.topics.verdicts, n,
                                                      timeout=max(120.0, n)))
    started = time.monotonic()
    await replay(settings, files, rate=None, limit=n)
    verdicts, finished = await collector
    worker.stop()
    await task
    totals = np.array([v["timings"]["total_ms"] for v in verdicts])
    return {
        "pipeline_eps": len(verdicts) / (finished - started), "pipeline_seconds": finished - started,
        "verdicts": len(verdicts), "p50_ms": float(np.percentile(totals, 50)), "p99_ms": float(np.percentile(totals, 99)),
        "delegated": int(sum(v["delegated"] for v in verdicts)),
        "mean_batch_size": _mean(worker, "ctd_batch_size"),
        "mean_batch_tokens": _mean(worker, "ctd_batch_tokens"),
    }


def _mean(worker: MonitorWorker, histogram: str) -> float:
    registry = worker.metrics.registry
    total = registry.get_sample_value(f"{histogram}_sum") or 0.0
    count = registry.get_sample_value(f"{histogram}_count") or 0.0
    return total / count if count else float("nan")


def bench_pipeline(settings: WorkerSettings, files: Sequence[Path], n: int, mode: str = "inline") -> dict[str, Any]:
    """Raw forward rate and end-to-end worker rate on the same ``n`` conversations, in one run."""
    monitor = Monitor(settings.worker.bundle, settings.model, cache_dir=settings.cache_dir)
    records = [r for path in files for r in read_file(path)][:n]
    raw = raw_forward_rate(monitor, [r.messages for r in records], settings)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "bench.jsonl"
        data.write_bytes(b"".join(orjson.dumps({"id": r.id, "text": r.messages[-1].content, "label": r.label,
                                                "source": r.source}) + b"\n" for r in records))
        broker = LocalBroker(cache_dir=settings.cache_dir, data_dir=Path(tmp) / "kafka")
        broker.start()
        try:
            suffix = uuid.uuid4().hex[:6]
            topics = TopicsConfig().suffixed(f"bench-{suffix}")
            broker.create_topics(topics.partitions(3))
            s = settings.model_copy(update={
                "topics": topics,
                "kafka": settings.kafka.model_copy(update={"bootstrap_servers": broker.bootstrap,
                                                           "group_id": f"bench-{suffix}"}),
                "worker": settings.worker.model_copy(update={"http_port": 0}),
            })
            pipe = asyncio.run(pipeline_rate(monitor, s, [data], len(records)))
        finally:
            broker.stop()
    return {
        "n": len(records), "model": monitor.model_version, "device": str(monitor.loaded.device),
        "dtype": str(monitor.loaded.dtype), "layers_run": monitor.loaded.max_layer,
        "layers_total": monitor.loaded.num_layers, "torch_threads": torch.get_num_threads(),
        "max_batch_tokens": settings.batching.max_batch_tokens, **raw, **pipe,
        "efficiency": pipe["pipeline_eps"] / raw["raw_forward_eps"],
    }
