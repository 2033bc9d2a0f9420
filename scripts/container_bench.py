"""Worker in its container vs the same worker on the host: cold start to ready and events/s, one run side by side.

    PYTHONPATH=. ~/.cache/ctd-monitor/venv/bin/python scripts/container_bench.py --events 300 [--model smollm2]

Needs the CPU image (./scripts/images.sh cpu) and podman. It starts the embedded broker, trains a small probe
bundle on the chosen monitored model (SmolLM2-135M by default: the model the image bakes in, so the container
loads it from the image as in production; `minilm` mounts the host's MiniLM weights instead), then for each of
host and container: starts the worker with identical settings, times `start → /healthz/ready` (model load
included), replays the same backlog of dataset events and times it until the last verdict is acknowledged.
Prints one JSON object. Uses the test-suite helpers (tests/), so run it from the repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ctd_monitor.local.broker import LocalBroker, resolve_cache_dir
from ctd_monitor.local.child import WorkerProcess, write_worker_config
from probes.activations.models import resolve_model_dir
from probes.config import DataConfig, FeatureConfig, ModelConfig, Settings, default_datasets_dir
from probes.fitting.pipeline import train_probe
from tests.container.stack import ENV_FILE, IMAGES, free_port, http_get, readable, run_service, stack_env
from tests.worker.helpers import (
    TopicWatcher,
    dataset_events,
    event_values,
    new_topics,
    produce_at_rate,
    worker_settings,
)
from worker.config import BatchingConfig, WorkerSettings

MODELS = {
    "smollm2": (ModelConfig(spec="smollm2-135m-instruct", dtype="fp32", max_tokens=256), 15),
    "minilm": (ModelConfig(spec="minilm-l6", dtype="fp32", max_tokens=64), 4),
}


def train_bundle(out: Path, model: ModelConfig, layer: int, cache_dir: Path) -> Path:
    settings = Settings(cache_dir=cache_dir, model=model, features=FeatureConfig(layer=layer, pooling="mean"),
                        data=DataConfig(datasets_dir=default_datasets_dir(),
                                        files=("xstest.jsonl", "harmbench.jsonl", "alpaca_benign.jsonl"),
                                        max_per_source=40))
    train_probe(settings, out)
    readable(out)
    return out


def settings_for(broker: LocalBroker, bundle: Path, cache_dir: Path, model: ModelConfig, port: int,
                 group: str) -> WorkerSettings:
    topics = new_topics(broker.create_topics)
    ws = worker_settings(broker.bootstrap, bundle, cache_dir, topics=topics, group=group, http_port=port)
    return ws.model_copy(update={"model": model,
                                 "batching": BatchingConfig(max_batch_tokens=8192, max_items=64, max_wait_ms=20)})


def wait_ready(port: int, alive: object, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while http_get(f"http://127.0.0.1:{port}/healthz/ready")[0] != 200:
        if time.monotonic() > deadline or not alive():  # type: ignore[operator]
            raise RuntimeError("worker never became ready")
        time.sleep(0.1)


async def backlog(ws: WorkerSettings, n: int) -> float:
    """Seconds from the first event produced to the last verdict read back (the worker already ready)."""
    events = dataset_events([default_datasets_dir() / "xstest.jsonl", default_datasets_dir() / "harmbench.jsonl",
                             default_datasets_dir() / "alpaca_benign.jsonl"], n, run_id=uuid.uuid4().hex[:12])
    watcher = await TopicWatcher(ws.kafka.bootstrap_servers, ws.topics.verdicts).start()
    try:
        started = time.monotonic()
        await produce_at_rate(ws.kafka.bootstrap_servers, ws.topics.input, event_values(events))
        wanted = {e.event_id for e in events}
        await watcher.wait(lambda w: wanted <= w.distinct(), timeout=1800)
        return time.monotonic() - started
    finally:
        await watcher.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    args = parser.parse_args()
    model, layer = MODELS[args.model]
    cache_dir = resolve_cache_dir()
    out: dict[str, object] = {"events": args.events, "model": model.spec, "env_file": str(ENV_FILE)}
    with tempfile.TemporaryDirectory(prefix="ctd-container-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)
        bundle = train_bundle(tmp / "bundle", model, layer, cache_dir)
        broker = LocalBroker(cache_dir=cache_dir, data_dir=tmp / "kafka")
        broker.start(timeout_s=120)
        try:
            # Host: the worker as a child process, with the stack's keys and flags like the container.
            env_backup = dict(os.environ)
            os.environ.update(stack_env())
            port = free_port()
            ws = settings_for(broker, bundle, cache_dir, model, port, f"bench-host-{uuid.uuid4().hex[:6]}")
            config = write_worker_config(tmp / "host.yaml", ws)
            t0 = time.monotonic()
            host = WorkerProcess(config, tmp / "host.log").start()
            try:
                wait_ready(port, host.running)
                out["host"] = {"cold_start_s": round(time.monotonic() - t0, 1)}
                seconds = asyncio.run(backlog(ws, args.events))
                out["host"] |= {"seconds": round(seconds, 1), "events_per_s": round(args.events / seconds, 1)}
            finally:
                host.terminate(60)
                os.environ.clear()
                os.environ.update(env_backup)

            # Container: the same settings file; the model comes from the image (SmolLM2) or a read-only mount.
            port = free_port()
            ws = settings_for(broker, bundle, cache_dir, model, port, f"bench-ctr-{uuid.uuid4().hex[:6]}")
            config = write_worker_config(tmp / "container.yaml", ws)
            config.chmod(0o644)
            mounts = {bundle: "/models/bundle"}
            env = {"CTD_CACHE_DIR": "/opt/ctd-cache"}
            if args.model == "minilm":
                mounts[resolve_model_dir("minilm-l6", cache_dir)] = "/models/minilm"
                env["CTD_MODEL__SPEC"] = "/models/minilm"
            container = run_service(IMAGES["cpu"], f"ctd-bench-{uuid.uuid4().hex[:6]}",
                                    ["run", "--bundle", "/models/bundle"], port=port, config=config, mounts=mounts,
                                    env=env)
            try:
                out["container"] = {"cold_start_s": round(container.wait_ready(600), 1)}
                seconds = asyncio.run(backlog(ws, args.events))
                out["container"] |= {"seconds": round(seconds, 1),  # type: ignore[operator]
                                     "events_per_s": round(args.events / seconds, 1)}
            finally:
                container.remove()
        finally:
            broker.stop()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
