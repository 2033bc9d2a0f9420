"""Shared pieces of the real-broker tests: a small MiniLM bundle, worker settings, topic readers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from probes.bundle import update_manifest
from probes.config import DataConfig, FeatureConfig, ModelConfig, Settings
from probes.features import FeatureExtractor
from probes.models import load_model
from probes.monitor import uncertainty
from probes.pipeline import prepare_data, train_probe
from worker.config import BatchingConfig, KafkaConfig, TopicsConfig, WorkerConfig, WorkerSettings

ALPHA = 0.35


def build_small_bundle(out: Path, datasets_dir: Path, cache_dir: Path) -> Path:
    """MiniLM probe on a few hundred real rows, with a fixed uncertainty threshold at ~20% delegation.

    The evaluation split is written to ``out/replay.jsonl``: replaying traffic from the calibration
    distribution must stay within the budget.
    """
    settings = Settings(
        cache_dir=cache_dir,
        model=ModelConfig(spec="minilm-l6", dtype="fp32", max_tokens=64),
        features=FeatureConfig(layer=4, pooling="mean"),
        data=DataConfig(datasets_dir=datasets_dir, files=("xstest.jsonl", "harmbench.jsonl", "alpaca_benign.jsonl"),
                        max_per_source=100),
    )
    prepared = prepare_data(settings)
    train_probe(settings, out, prepared=prepared)
    loaded = load_model("minilm-l6", cache_dir=cache_dir, dtype="fp32", max_layer=4)
    from probes.bundle import load_bundle

    bundle = load_bundle(out)
    extractor = FeatureExtractor(loaded, layer=4, max_tokens=64, batch_tokens=4096, max_items=64)
    features = extractor.pooled([r.messages for r in prepared.splits.calibration], "mean")
    signal = uncertainty(bundle.heads["safety"].proba(features))
    threshold = float(np.quantile(signal, 0.8))
    with (out / "replay.jsonl").open("wb") as handle:
        for r in prepared.splits.evaluation:
            handle.write(orjson.dumps({"id": r.id, "text": r.messages[0].content, "label": r.label,
                                       "source": r.source, "category": r.category}) + b"\n")
    update_manifest(out, calibration={"signal": "uncertainty", "threshold": threshold, "alpha": ALPHA,
                                      "delta": 0.1, "variant": "fixed-test"})
    return out


def worker_settings(bootstrap: str, bundle: Path, cache_dir: Path, *, topics: TopicsConfig, group: str,
                    **worker: Any) -> WorkerSettings:
    return WorkerSettings(
        cache_dir=cache_dir,
        model=ModelConfig(spec="minilm-l6", dtype="fp32", max_tokens=64),
        kafka=KafkaConfig(bootstrap_servers=bootstrap, group_id=group, session_timeout_ms=10_000,
                          heartbeat_interval_ms=1_000),
        topics=topics,
        batching=BatchingConfig(max_batch_tokens=2048, max_items=32, max_wait_ms=20),
        worker=WorkerConfig(bundle=bundle, http_port=0, http_host="127.0.0.1", commit_interval_s=0.2,
                            shutdown_deadline_s=10, **worker),
    )


def new_topics(create: Callable[[dict[str, int]], None], partitions: int = 3) -> TopicsConfig:
    topics = TopicsConfig().suffixed(uuid.uuid4().hex[:8])
    create(topics.partitions(partitions))
    return topics


async def read_topic(bootstrap: str, topic: str, *, until: Callable[[list[dict[str, Any]]], bool],
                     timeout: float = 60.0) -> list[dict[str, Any]]:
    """Read a topic from the start until ``until(records)`` holds or the timeout passes."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not until(out):
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                out.extend(orjson.loads(r.value) for r in records)
    finally:
        await consumer.stop()
    return out


async def produce_raw(bootstrap: str, topic: str, values: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in values:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def distinct(records: list[dict[str, Any]], key: str = "event_id") -> set[str]:
    return {r[key] for r in records}


async def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.05)
