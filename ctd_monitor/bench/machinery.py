"""``bench machinery``: the worker's host-side ceiling, with the forward pass replaced by a null extractor.

Everything around the model runs for real: a real local broker, fetch, decode and validation, chat-template
rendering and tokenization, micro-batching and collation, the bundle's heads, live budget control, verdict
serialisation, publish, broker acks and commits. Only the monitored model's forward pass is swapped for
``NullExtractor``, which returns pooled states of the right shape at once. The events/s it reports is what one
worker process can feed a device that is infinitely fast, to be read next to the device's own forward rate.

The worker runs as a child process on a backlog (``python -m ctd_monitor.bench.machinery CONFIG``), as
deployed, so the replay producer and the verdict collector do not share its interpreter; its rate comes from
the verdicts' own stamps (``worker_window``), its CPU time from the OS, and its per-stage CPU time from its
``ctd_stage_cpu_seconds`` counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from prometheus_client.parser import text_string_to_metric_families

from ctd_monitor.bench.pipeline import (
    _collect_verdicts,
    _latency_summary,
    bench_topics,
    drain_backlog,
    metrics_text,
    worker_window,
)
from ctd_monitor.local.broker import LocalBroker
from ctd_monitor.local.child import WorkerProcess, write_worker_config
from ctd_monitor.local.replay import replay_records
from probes.activations.features import FeatureExtractor, FloatArray, TokenBatch
from probes.config import Pooling, load_settings
from probes.data import Record, read_file
from probes.logs import configure_logging
from probes.runtime.monitor import Monitor
from worker.config import WorkerSettings
from worker.main import settle_collector, warm_up
from worker.monitor import monitor_stream

# The worker's stage timers (worker/metrics.py StageClock) and what they cover.
STAGES = ("decode", "render_tokenize", "batch_collate", "score", "budget", "serialise_publish", "commit")


class NullExtractor(FeatureExtractor):
    """The feature extractor with its forward pass replaced: pooled states from a fixed pool, instantly.

    A test double for ``bench machinery`` only. Tokenization, the pad id and the hidden size stay the real
    model's; the states are standard normal rows, so the heads' outputs vary and some events delegate.
    """

    def __init__(self, real: FeatureExtractor, rows: int = 4096, seed: int = 0) -> None:
        super().__init__(real.loaded, layer=real.layer, max_tokens=real.max_tokens, batch_tokens=real.batch_tokens,
                         max_items=real.max_items)
        self._states = np.random.default_rng(seed).standard_normal((rows, real.loaded.hidden_size),
                                                                   dtype=np.float32)
        self._next = 0

    def pooled_batch(self, batch: TokenBatch, pooling: Pooling) -> FloatArray:
        rows = np.arange(self._next, self._next + len(batch.indices)) % len(self._states)
        self._next = int(rows[-1]) + 1
        return self._states[rows]


def null_monitor(settings: WorkerSettings) -> Monitor:
    """The bundle's monitor (real tokenizer, heads and rule) with the null forward pass."""
    monitor = Monitor(settings.worker.bundle, settings.model, cache_dir=settings.cache_dir)
    monitor.extractor = NullExtractor(monitor.extractor)
    return monitor


def serve(config: Path, profile: Path | None = None) -> None:
    """The child: a monitor worker on the null forward pass until SIGTERM (``python -m`` entry point)."""
    settings = load_settings(config, cls=WorkerSettings)
    configure_logging(settings.log_level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as run_worker does
    monitor = null_monitor(settings)
    warm_up(monitor, settings)  # as run_worker does before joining the group
    worker = monitor_stream(settings, monitor)
    settle_collector()  # as run_worker does after loading the model

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    if profile is None:
        asyncio.run(main())
        return
    import cProfile

    # Profiles the event loop's thread only; the prep and inference threads show in the stage counters.
    with cProfile.Profile() as prof:
        asyncio.run(main())
    prof.dump_stats(str(profile))


def null_worker_process(config: Path, log_path: Path, profile: Path | None = None) -> WorkerProcess:
    """``serve`` in a child process, through the runner ``bench pipeline``'s worker uses (``WorkerProcess``)."""
    extra = [] if profile is None else [str(profile)]
    return WorkerProcess(config, log_path, argv=["-m", "ctd_monitor.bench.machinery", str(config), *extra])


def stage_seconds(metrics_text: str) -> dict[str, float]:
    """{stage: CPU seconds} from a worker's /metrics."""
    out = dict.fromkeys(STAGES, 0.0)
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "ctd_stage_cpu_seconds_total":
                out[sample.labels["stage"]] = float(sample.value)
    return out


def batch_count(metrics_text: str) -> int:
    """Inference batches a worker ran (its ``ctd_batch_size`` histogram's count): per-batch work is paid this often."""
    return sum(int(sample.value) for family in text_string_to_metric_families(metrics_text)
               for sample in family.samples if sample.name == "ctd_batch_size_count")


def breakdown(stages: dict[str, float], cpu_seconds: float, events: int) -> dict[str, Any]:
    """The issue's six stages (heads+budget = score + budget; the forward pass is null) as CPU shares."""
    grouped = {
        "decode": stages["decode"], "render_tokenize": stages["render_tokenize"],
        "batch_collate": stages["batch_collate"], "heads_budget": stages["score"] + stages["budget"],
        "serialise_publish": stages["serialise_publish"], "commit": stages["commit"],
    }
    grouped["unattributed"] = max(0.0, cpu_seconds - sum(grouped.values()))
    return {name: {"cpu_seconds": round(s, 4), "us_per_event": round(1e6 * s / events, 2),
                   "share": round(s / cpu_seconds, 4) if cpu_seconds > 0 else None}
            for name, s in grouped.items()}


async def _one_run(settings: WorkerSettings, records: Sequence[Record], workdir: Path,
                   profile: Path | None) -> dict[str, Any]:
    n = len(records)
    await replay_records(settings, records, rate=None)  # the backlog, before the worker starts
    config = write_worker_config(workdir / "worker.yaml", settings)
    with null_worker_process(config, workdir / "worker.log", profile) as proc:
        drained = await drain_backlog(proc, settings, n, timeout=max(120.0, n / 50))
    return _figures(n, drained.verdicts, drained.cpu_seconds, stage_seconds(drained.metrics_text),
                    {"batches": batch_count(drained.metrics_text), "worker_exit_code": drained.exit_code})


def _figures(n: int, verdicts: Sequence[dict[str, Any]], cpu: float, stages: dict[str, float],
             extra: dict[str, Any]) -> dict[str, Any]:
    window = worker_window(verdicts)
    return {
        "events_per_s": round(n / window, 1), "worker_seconds": round(window, 3),
        "cpu_seconds": round(cpu, 3), "cpu_us_per_event": round(1e6 * cpu / n, 1),
        # What the worker would sustain with its CPU time undiluted by neighbours (on a shared machine the
        # window stretches with the run queue; CPU seconds per event far less).
        "events_per_cpu_s": round(n / cpu, 1) if cpu > 0 else None,
        "cpu_cores_used": round(cpu / window, 3), **_latency_summary(verdicts),
        "stages": breakdown(stages, cpu, n), "stage_cpu_seconds": {k: round(v, 4) for k, v in stages.items()},
        **extra,
    }


def _assigned(proc: WorkerProcess) -> int:
    """Partitions the child holds after its latest assignment (0 before its first)."""
    lines = [line for line in proc.log_tail(1 << 22).splitlines() if '"partitions.assigned"' in line]
    return len(orjson.loads(lines[-1]).get("partitions", [])) if lines else 0


async def _processes_run(settings: WorkerSettings, records: Sequence[Record], workdir: Path, processes: int,
                         partitions: int) -> dict[str, Any]:
    """``processes`` workers in one group on ``processes × partitions`` partitions, fed live once every one holds
    its share: a backlog would be half drained by the first to join before the group rebalances."""
    n = len(records)
    config = write_worker_config(workdir / "worker.yaml", settings)
    procs = [null_worker_process(config, workdir / f"worker-{i}.log") for i in range(processes)]
    with contextlib.ExitStack() as stack:
        for proc in procs:
            stack.enter_context(proc)
        deadline = time.monotonic() + 180
        while [_assigned(p) for p in procs] != [partitions] * processes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the group did not settle: {[_assigned(p) for p in procs]} partitions held")
            await asyncio.sleep(0.1)
        collecting = asyncio.create_task(_collect_verdicts(settings.kafka.bootstrap_servers, settings.topics.verdicts,
                                                           n, timeout=max(120.0, n / 50)))
        cpu_start = [p.cpu_seconds() for p in procs]
        replayed = await replay_records(settings, records, rate=None)
        verdicts, _ = await collecting
        cpu = sum(p.cpu_seconds() - c for p, c in zip(procs, cpu_start, strict=True))
        texts = [await metrics_text(p) for p in procs]
        codes = [p.terminate(settings.worker.shutdown_deadline_s + 10) for p in procs]
    if len(verdicts) < n:
        raise RuntimeError(f"only {len(verdicts)} of {n} verdicts (worker exits {codes})")
    stages = dict.fromkeys(STAGES, 0.0)
    for text in texts:
        for stage, seconds in stage_seconds(text).items():
            stages[stage] += seconds
    return _figures(n, verdicts, cpu, stages, {"processes": processes, "batches": sum(map(batch_count, texts)),
                                               "worker_exit_codes": codes,
                                               "producer_events_per_s": replayed["rate"]})


def _records(files: Sequence[Path], n: int) -> list[Record]:
    pool = [r for path in files for r in read_file(path)]
    if not pool:
        raise ValueError("no records in the bench data")
    return [pool[i % len(pool)] for i in range(n)]  # repeated as needed: each replay gives fresh event ids


def bench_machinery(settings: WorkerSettings, files: Sequence[Path], n: int, partitions: Sequence[int] = (1, 2, 4),
                    broker: LocalBroker | None = None, profile_dir: Path | None = None,
                    processes: Sequence[int] = (1,)) -> dict[str, Any]:
    """Host-side ceiling of one worker process for each input partition count, on ``n`` events each.

    With ``processes`` other than (1,): for each count P in it, P worker processes in one group, each holding
    ``partitions`` input partitions, fed live (the producer's rate is reported beside theirs); keyed ``pP-cC``.
    """
    records = _records(files, n)
    runs: dict[str, Any] = {}
    live = tuple(processes) != (1,)
    with tempfile.TemporaryDirectory() as tmp:
        own = broker is None
        if broker is None:
            broker = LocalBroker(cache_dir=settings.cache_dir, data_dir=Path(tmp) / "kafka")
            broker.start()
        try:
            for count in partitions:
                for procs in processes if live else (1,):
                    key = f"p{procs}-c{count}" if live else str(count)
                    workdir = Path(tmp) / key
                    workdir.mkdir()
                    with bench_topics(settings, workdir, broker, partitions=count * procs) as s:
                        if live:
                            runs[key] = asyncio.run(_processes_run(s, records, workdir, procs, count))
                        else:
                            profile = None if profile_dir is None else profile_dir / f"machinery-p{count}.pstats"
                            runs[key] = asyncio.run(_one_run(s, records, workdir, profile))
        finally:
            if own:
                broker.stop()
    return {
        "n": n, "mode": "processes (live feed)" if live else "process",
        "forward": "null (NullExtractor: pooled states of the model's width, no model)",
        "bundle": str(settings.worker.bundle), "data": [str(f) for f in files],
        "max_batch_tokens": settings.batching.max_batch_tokens, "max_items": settings.batching.max_items,
        "max_in_flight": settings.worker.max_in_flight, "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "partitions": runs,
    }


if __name__ == "__main__":
    serve(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
