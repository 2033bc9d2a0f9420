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
import gc
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from ctd_monitor.bench.pipeline import _latency_summary, bench_topics, drain_backlog, worker_window
from ctd_monitor.local.broker import LocalBroker
from ctd_monitor.local.child import WorkerProcess, write_worker_config
from ctd_monitor.local.replay import replay_records
from probes.activations.features import FeatureExtractor, FloatArray, TokenBatch
from probes.config import Pooling, load_settings
from probes.data import Record, read_file
from probes.logs import configure_logging
from probes.runtime.monitor import Monitor
from worker.config import WorkerSettings
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
    worker = monitor_stream(settings, null_monitor(settings))
    gc.freeze()  # as run_worker does after loading the model

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
    verdicts, cpu, code = drained.verdicts, drained.cpu_seconds, drained.exit_code
    window = worker_window(verdicts)
    stages = stage_seconds(drained.metrics_text)
    return {
        "events_per_s": round(n / window, 1), "worker_seconds": round(window, 3),
        "cpu_seconds": round(cpu, 3), "cpu_us_per_event": round(1e6 * cpu / n, 1),
        # What the worker would sustain with its CPU time undiluted by neighbours (on a shared machine the
        # window stretches with the run queue; CPU seconds per event far less).
        "events_per_cpu_s": round(n / cpu, 1) if cpu > 0 else None,
        "cpu_cores_used": round(cpu / window, 3), **_latency_summary(verdicts),
        "stages": breakdown(stages, cpu, n), "stage_cpu_seconds": {k: round(v, 4) for k, v in stages.items()},
        "worker_exit_code": code,
    }


def _records(files: Sequence[Path], n: int) -> list[Record]:
    pool = [r for path in files for r in read_file(path)]
    if not pool:
        raise ValueError("no records in the bench data")
    return [pool[i % len(pool)] for i in range(n)]  # repeated as needed: each replay gives fresh event ids


def bench_machinery(settings: WorkerSettings, files: Sequence[Path], n: int, partitions: Sequence[int] = (1, 2, 4),
                    broker: LocalBroker | None = None, profile_dir: Path | None = None) -> dict[str, Any]:
    """Host-side ceiling of one worker process for each input partition count, on ``n`` events each."""
    records = _records(files, n)
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        own = broker is None
        if broker is None:
            broker = LocalBroker(cache_dir=settings.cache_dir, data_dir=Path(tmp) / "kafka")
            broker.start()
        try:
            for count in partitions:
                workdir = Path(tmp) / f"p{count}"
                workdir.mkdir()
                profile = None if profile_dir is None else profile_dir / f"machinery-p{count}.pstats"
                with bench_topics(settings, workdir, broker, partitions=count) as s:
                    runs[str(count)] = asyncio.run(_one_run(s, records, workdir, profile))
        finally:
            if own:
                broker.stop()
    return {
        "n": n, "mode": "process", "forward": "null (NullExtractor: pooled states of the model's width, no model)",
        "bundle": str(settings.worker.bundle), "data": [str(f) for f in files],
        "max_batch_tokens": settings.batching.max_batch_tokens, "max_items": settings.batching.max_items,
        "max_in_flight": settings.worker.max_in_flight, "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "partitions": runs,
    }


if __name__ == "__main__":
    serve(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
