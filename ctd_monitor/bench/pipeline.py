"""Benchmarks that print JSON: the worker's end-to-end rate through a real broker versus a bare forward loop.

Both sides use the same texts, the same truncated model and the same token-budget batches, so
``efficiency`` isolates what the streaming machinery costs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from aiokafka import AIOKafkaConsumer

from ctd_monitor.bench.gpu import GpuSampler
from ctd_monitor.local.broker import LocalBroker
from ctd_monitor.local.child import WorkerProcess, child_env, write_worker_config
from ctd_monitor.local.replay import replay
from probes.activations.batching import plan_batches
from probes.data import Record, read_file
from probes.runtime.monitor import Monitor
from worker.config import TopicsConfig, WorkerSettings
from worker.monitor import monitor_stream
from worker.signing import generate_audit_secret, generate_keys


def raw_forward_rate(monitor: Monitor, conversations: Sequence[Any], settings: WorkerSettings) -> dict[str, float]:
    """Events/s of a bare loop over pre-tokenized, pre-collated batches (forward pass + pooling only).

    The rows are the ones the worker scores: a conversation longer than ``max_tokens`` is also read in windows
    (probes/activations/windows.py). Counting only its truncated view made the baseline several times less work than the
    worker on long traffic. Here rows are packed by length across conversations, the best a device can do.
    """
    ids = [row for rows in monitor.tokenize_windows_batch(conversations) for row in rows]
    b = settings.batching
    plan = plan_batches([len(x) for x in ids], batch_tokens=b.max_batch_tokens, max_items=b.max_items)
    batches = [monitor.collate([ids[i] for i in batch]) for batch in plan]

    def timed_pass() -> tuple[float, float]:
        started, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            monitor.features(batch)
        return time.perf_counter() - started, time.process_time() - cpu

    # On a thread like the worker's inference thread, after a full warm-up pass: a fresh process runs its
    # first passes far slower, and the main thread's allocator behaves differently from a worker thread's.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bench-raw") as pool:
        pool.submit(timed_pass).result()
        elapsed, cpu = pool.submit(timed_pass).result()
    tokens = sum(len(x) for x in ids)
    return {"raw_forward_eps": len(conversations) / elapsed, "raw_seconds": elapsed, "raw_cpu_seconds": cpu,
            "tokens": float(tokens), "rows": float(len(ids)), "batches": float(len(batches)),
            "padded_tokens": float(sum(b.padded_tokens for b in batches))}


def raw_forward_rate_process(settings: WorkerSettings, data: Path, n: int, workdir: Path) -> dict[str, float]:
    """``raw_forward_rate`` in a child process (``ctd_monitor.bench.raw``) on the records of ``data``."""
    config = write_worker_config(workdir / "raw.yaml", settings)
    done = subprocess.run([sys.executable, "-m", "ctd_monitor.bench.raw", str(config), str(data), str(n)],
                          env=child_env(), capture_output=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"raw forward child failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    result: dict[str, float] = orjson.loads(done.stdout)
    return result


async def _collect_verdicts(bootstrap: str, topic: str, n: int, timeout: float) -> tuple[list[dict[str, Any]], float]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None,
                                isolation_level="read_committed")
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


def worker_window(verdicts: Sequence[dict[str, Any]]) -> float:
    """Seconds from the worker's first fetched event to its last verdict, from the verdicts' own stamps.

    ``decided_at`` is the worker's clock and ``total_ms`` runs from fetch to decision, so the window
    covers the worker alone: not its start-up, not the producer, not the collector.
    """
    decided = np.array([dt.datetime.fromisoformat(v["decided_at"]).timestamp() for v in verdicts])
    fetched = decided - np.array([v["timings"]["total_ms"] for v in verdicts]) / 1000.0
    return float(decided.max() - fetched.min())


def _latency_summary(verdicts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    totals = np.array([v["timings"]["total_ms"] for v in verdicts])
    return {"verdicts": len(verdicts), "p50_ms": float(np.percentile(totals, 50)),
            "p99_ms": float(np.percentile(totals, 99)), "delegated": int(sum(v["delegated"] for v in verdicts))}


async def pipeline_rate(monitor: Monitor, settings: WorkerSettings, files: Sequence[Path], n: int) -> dict[str, Any]:
    """Inline: the worker on this process's event loop while the same loop replays and collects."""
    worker = monitor_stream(settings, monitor)
    task = asyncio.create_task(worker.run())
    while not worker.ready():
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    collector = asyncio.create_task(_collect_verdicts(settings.kafka.bootstrap_servers, settings.topics.verdicts, n,
                                                      timeout=max(120.0, n)))
    started, cpu = time.monotonic(), time.process_time()
    await replay(settings, files, rate=None, limit=n)
    verdicts, finished = await collector
    cpu = time.process_time() - cpu
    worker.stop()
    await task
    return {
        # The process's CPU time: the worker's, and the replay producer's and the collector's with it.
        "worker_cpu_seconds": cpu,
        "pipeline_eps": len(verdicts) / worker_window(verdicts), "worker_seconds": worker_window(verdicts),
        "wall_eps": len(verdicts) / (finished - started), "wall_seconds": finished - started,
        **_latency_summary(verdicts),
        "mean_batch_size": _mean(worker.metrics.registry, "ctd_batch_size"),
        "mean_batch_tokens": _mean(worker.metrics.registry, "ctd_batch_tokens"),
        "inference_seconds": worker.metrics.registry.get_sample_value("ctd_inference_latency_seconds_sum"),
    }


async def pipeline_rate_process(settings: WorkerSettings, files: Sequence[Path], n: int,
                                workdir: Path) -> dict[str, Any]:
    """As deployed: a backlog of ``n`` events, then the worker in a child process drains it."""
    await replay(settings, files, rate=None, limit=n)
    config = write_worker_config(workdir / "worker.yaml", settings)
    with WorkerProcess(config, workdir / "worker.log") as proc:
        started = time.monotonic()
        drained = await drain_backlog(proc, settings, n, timeout=max(180.0, 2.0 * n))
    verdicts, finished, cpu = drained.verdicts, drained.finished, drained.cpu_seconds
    metrics = unlabelled_samples(drained.metrics_text)
    return {
        "pipeline_eps": len(verdicts) / worker_window(verdicts), "worker_seconds": worker_window(verdicts),
        "wall_seconds_with_startup": finished - started, "worker_cpu_seconds": cpu, **_latency_summary(verdicts),
        "mean_batch_size": _ratio(metrics, "ctd_batch_size"), "mean_batch_tokens": _ratio(metrics, "ctd_batch_tokens"),
        "inference_seconds": metrics.get("ctd_inference_latency_seconds_sum", float("nan")),
    }


@dataclass(frozen=True)
class Drained:
    """What a worker child did with a backlog: its verdicts, when the last came, its CPU time, its /metrics."""

    verdicts: list[dict[str, Any]]
    finished: float
    cpu_seconds: float
    metrics_text: str
    exit_code: int | None


async def drain_backlog(proc: WorkerProcess, settings: WorkerSettings, n: int, *, timeout: float) -> Drained:
    """Collect ``n`` verdicts from the started child, read its /metrics, stop it; fewer verdicts is an error.

    CPU time runs from the end of start-up (model loaded, group joined) to the last verdict. Not immune to
    neighbours either: torch's OpenMP threads spin at barriers when a sibling is descheduled.
    """
    collecting = asyncio.create_task(_collect_verdicts(settings.kafka.bootstrap_servers, settings.topics.verdicts,
                                                       n, timeout=timeout))
    while not proc.logged('"worker.started"') and not collecting.done():
        await asyncio.sleep(0.01)
    cpu_start = proc.cpu_seconds()
    verdicts, finished = await collecting
    cpu = proc.cpu_seconds() - cpu_start
    text = await metrics_text(proc)
    code = proc.terminate(settings.worker.shutdown_deadline_s + 10)
    if len(verdicts) < n:
        raise RuntimeError(f"only {len(verdicts)} of {n} verdicts (worker exit {code}): {proc.log_tail()}")
    return Drained(verdicts=verdicts, finished=finished, cpu_seconds=cpu, metrics_text=text, exit_code=code)


async def metrics_text(proc: WorkerProcess) -> str:
    """The child's /metrics exposition ("" when it serves none)."""
    import httpx

    port = proc.http_port()
    if port is None:
        return ""
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text


def unlabelled_samples(text: str) -> dict[str, float]:
    """{sample: value} of a /metrics exposition, unlabelled samples only."""
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: float(s.value) for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def _ratio(samples: dict[str, float], histogram: str) -> float:
    count = samples.get(f"{histogram}_count", 0.0)
    return samples.get(f"{histogram}_sum", 0.0) / count if count else float("nan")


def _mean(registry: Any, histogram: str) -> float:
    total = registry.get_sample_value(f"{histogram}_sum") or 0.0
    count = registry.get_sample_value(f"{histogram}_count") or 0.0
    return float(total / count) if count else float("nan")


@contextlib.contextmanager
def bench_topics(settings: WorkerSettings, workdir: Path, broker: LocalBroker | None = None,
                 partitions: int = 3) -> Iterator[WorkerSettings]:
    """Fresh topics and group on ``broker`` (or on a local broker started for the run): the settings to use.

    Without ``signing.keys_dir`` the run gets fresh keys of its own: the worker measured signs as deployed."""
    own = broker is None
    if broker is None:
        broker = LocalBroker(cache_dir=settings.cache_dir, data_dir=workdir / "kafka")
        broker.start()
    try:
        suffix = uuid.uuid4().hex[:6]
        topics = TopicsConfig().suffixed(f"bench-{suffix}")
        broker.create_topics(topics.partitions(partitions))
        signing = settings.signing
        if signing.keys_dir is None:
            generate_keys(workdir / "keys")
            generate_audit_secret(workdir / "keys")
            signing = signing.model_copy(update={"keys_dir": workdir / "keys"})
        yield settings.model_copy(update={
            "signing": signing,
            "topics": topics,
            "kafka": settings.kafka.model_copy(update={"bootstrap_servers": broker.bootstrap,
                                                       "group_id": f"bench-{suffix}"}),
            "worker": settings.worker.model_copy(update={"http_port": 0, "http_host": "127.0.0.1"}),
        })
    finally:
        if own:
            broker.stop()


def write_records(path: Path, records: Sequence[Record]) -> Path:
    path.write_bytes(b"".join(orjson.dumps({"id": r.id, "text": r.messages[-1].content, "label": r.label,
                                            "source": r.source}) + b"\n" for r in records))
    return path


def bench_pipeline(settings: WorkerSettings, files: Sequence[Path], n: int, mode: str = "process",
                   broker: LocalBroker | None = None) -> dict[str, Any]:
    """Raw forward rate and end-to-end worker rate on the same ``n`` conversations, in one run.

    ``process`` (default) runs the worker as a child process on a backlog, as deployed, so replay and
    collection do not compete with it for the interpreter; ``inline`` runs all three on one event loop.
    """
    monitor = Monitor(settings.worker.bundle, settings.model, cache_dir=settings.cache_dir)
    records = [r for path in files for r in read_file(path)][:n]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_records(Path(tmp) / "bench.jsonl", records)

        def raw_rate() -> dict[str, float]:
            if mode == "process":  # in a fresh process too, like the worker it is compared with
                return raw_forward_rate_process(settings, data, len(records), Path(tmp))
            return raw_forward_rate(monitor, [r.messages for r in records], settings)

        with GpuSampler(monitor.loaded.device) as gpu_raw:
            raw = raw_rate()
        with bench_topics(settings, Path(tmp), broker) as s, GpuSampler(monitor.loaded.device) as gpu_pipeline:
            if mode == "process":
                pipe = asyncio.run(pipeline_rate_process(s, [data], len(records), Path(tmp)))
            else:
                pipe = asyncio.run(pipeline_rate(monitor, s, [data], len(records)))
        # The raw rate again after the pipeline: on a shared machine the CPU share drifts, and the mean of a
        # measurement on each side of the pipeline run is the fairer baseline.
        raw_after = raw_rate()
    baseline = (raw["raw_forward_eps"] + raw_after["raw_forward_eps"]) / 2
    return {
        "n": len(records), "mode": mode, "model": monitor.model_version, "device": str(monitor.loaded.device),
        "dtype": str(monitor.loaded.dtype), "layers_run": monitor.loaded.max_layer,
        "layers_total": monitor.loaded.num_layers, "torch_threads": torch.get_num_threads(),
        "max_batch_tokens": settings.batching.max_batch_tokens, **raw,
        "raw_forward_eps_before": raw["raw_forward_eps"], "raw_forward_eps_after": raw_after["raw_forward_eps"],
        "raw_forward_eps": baseline, **pipe,
        "efficiency": pipe["pipeline_eps"] / baseline,
        # Share of the worker's window spent in torch: what the streaming machinery costs, measured inside
        # one process, so neighbours on a shared machine move it far less than the two-rate ratio above.
        "machinery_efficiency": pipe["inference_seconds"] / pipe["worker_seconds"],
        "cpu_efficiency": (raw["raw_cpu_seconds"] + raw_after["raw_cpu_seconds"]) / 2 / pipe["worker_cpu_seconds"],
        "gpu_raw": gpu_raw.summary(), "gpu_pipeline": gpu_pipeline.summary(),
    }
