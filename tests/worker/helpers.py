"""Shared pieces of the real-broker tests: a small MiniLM bundle, worker settings, topic readers."""

from __future__ import annotations

import asyncio
import atexit
import functools
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import Counter

from ctd_monitor.local.child import WorkerProcess, write_worker_config
from ctd_monitor.local.replay import record_event
from probes.activations.features import FeatureExtractor
from probes.activations.models import load_model
from probes.config import DataConfig, FeatureConfig, ModelConfig, Settings
from probes.conversation import Conversation
from probes.data import read_file
from probes.experts.encoder_head import EncoderHeadExpert
from probes.fitting.pipeline import prepare_data, train_probe
from probes.runtime.bundle import update_manifest
from probes.runtime.monitor import uncertainty
from worker.config import (
    AlertsConfig,
    BatchingConfig,
    GuardConfig,
    GuardSettings,
    KafkaConfig,
    SigningConfig,
    TopicsConfig,
    WorkerConfig,
    WorkerSettings,
)
from worker.events import ConversationEvent, ReviewRequest, utcnow
from worker.main import GuardProcess
from worker.monitor import MonitorStream, monitor_stream
from worker.signing import Signer, generate_audit_secret, generate_keys

ALPHA = 0.35


@functools.cache
def session_keys_dir() -> Path:
    """Real per-role Ed25519 keys and an audit secret, once per test process (``ctd-monitor keys`` does the same).

    tests/worker/conftest.py points ``CTD_SIGNING__KEYS_DIR`` here for every test, so every service a test builds
    (child processes too) runs the secure default: signed records, checked by role, fresh.
    """
    directory = Path(tempfile.mkdtemp(prefix="ctd-test-keys-"))
    atexit.register(shutil.rmtree, directory, True)
    generate_keys(directory)
    generate_audit_secret(directory)
    return directory


def signing_config(**overrides: Any) -> SigningConfig:
    """The tests' signing settings: the session's real keys."""
    return SigningConfig(**{"keys_dir": session_keys_dir(), **overrides})


def role_signer(role: str) -> Signer:
    """A signer holding ``role``'s private key (what a test plays that role, or a compromised one, with)."""
    return Signer.from_config(signing_config(), role)  # type: ignore[arg-type]


def build_small_bundle(out: Path, datasets_dir: Path, cache_dir: Path) -> Path:
    """MiniLM probe on a few hundred real rows, with a fixed uncertainty threshold at ~20% delegation.

    The evaluation split is written to ``out/replay.jsonl``: replaying traffic from the calibration
    distribution must stay within the budget.
    """
    settings = Settings(
        cache_dir=cache_dir,
        model=ModelConfig(spec="minilm-l6", dtype="fp32", max_tokens=64),
        features=FeatureConfig(layer=4, pooling="mean"),
        # xstest unbalanced (all 250 safe / 200 unsafe rows capped at 100 as they come): the bundle the worker
        # tests' figures were measured on, from before per-source class balance became the default
        data=DataConfig(datasets_dir=datasets_dir, files=("xstest.jsonl", "harmbench.jsonl", "alpaca_benign.jsonl"),
                        max_per_source=100, class_balance_per_source=False),
    )
    prepared = prepare_data(settings)
    train_probe(settings, out, prepared=prepared)
    loaded = load_model("minilm-l6", cache_dir=cache_dir, dtype="fp32", max_layer=4)
    from probes.runtime.bundle import load_bundle

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
        worker=WorkerConfig(**{"bundle": bundle, "http_port": 0, "http_host": "127.0.0.1", "commit_interval_s": 0.2,
                               "shutdown_deadline_s": 10, **worker}),
        signing=signing_config(),
    )


def new_topics(create: Callable[[dict[str, int]], None], partitions: int = 3) -> TopicsConfig:
    topics = TopicsConfig().suffixed(uuid.uuid4().hex[:8])
    create(topics.partitions(partitions))
    return topics


async def read_topic(bootstrap: str, topic: str, *, until: Callable[[list[dict[str, Any]]], bool],
                     timeout: float = 60.0) -> list[dict[str, Any]]:
    """Read a topic from the start until ``until(records)`` holds or the timeout passes."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None, isolation_level="read_committed")
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


async def produce_raw(bootstrap: str, topic: str, values: list[tuple[bytes | None, bytes | None]], *,
                      sign: str | None = None, role: str = "worker") -> None:
    """A plain producer; ``sign``: the record kind to sign each record as, with ``role``'s key (as that role's
    service publishes it)."""
    signer = role_signer(role) if sign is not None else None
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in values:
            headers = signer.headers(sign, key, value or b"") if signer is not None else None  # type: ignore[arg-type]
            await producer.send_and_wait(topic, value, key=key, headers=headers)
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


async def start_stream(settings: WorkerSettings, monitor: Any) -> tuple[MonitorStream, asyncio.Task[None]]:
    """The monitor stream running on this loop, once it has joined its group (its failure to start raised)."""
    worker = monitor_stream(settings, monitor)
    return worker, await _run_until_ready(worker)


async def _run_until_ready(service: MonitorStream | GuardProcess) -> asyncio.Task[None]:
    """``service.run()`` on this loop once it reports ready (its failure to start raised)."""
    task = asyncio.create_task(service.run())
    await wait_for(lambda: service.ready() or task.done(), timeout=60)
    assert not task.done(), task.exception()
    return task


def mixed_files(datasets_dir: Path) -> list[Path]:
    """Benign look-alikes and harmful requests: the mixed traffic the Kafka tests replay."""
    return [datasets_dir / "xstest.jsonl", datasets_dir / "harmbench.jsonl"]


def spawn_worker(settings: WorkerSettings, directory: Path, name: str = "worker") -> WorkerProcess:
    """``ctd-monitor run`` as a child process on ``settings``; its log is ``directory/<name>.log``."""
    config = write_worker_config(directory / f"{name}.yaml", settings)
    return WorkerProcess(config, directory / f"{name}.log").start()


def dataset_events(files: list[Path], n: int, run_id: str | None = None) -> list[ConversationEvent]:
    """The first ``n`` conversations of ``files`` as events with unique ids (labels in metadata)."""
    records = [r for path in files for r in read_file(path)][:n]
    run = run_id or uuid.uuid4().hex[:12]
    return [record_event(r, run_id=run, index=i) for i, r in enumerate(records)]


async def produce_at_rate(bootstrap: str, topic: str, values: list[tuple[bytes | None, bytes | None]],
                          rate: float | None = None, *, sign: str | None = None, role: str = "worker") -> None:
    """Produce ``(key, value)`` pairs at ``rate`` per second (None: as fast as acks allow); every one acked.
    ``sign``: as in ``produce_raw``."""
    signer = role_signer(role) if sign is not None else None
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    started = time.monotonic()
    try:
        futures = []
        for i, (key, value) in enumerate(values):
            if rate:
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            headers = signer.headers(sign, key, value or b"") if signer is not None else None  # type: ignore[arg-type]
            futures.append(await producer.send(topic, value, key=key, headers=headers))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def event_values(events: list[ConversationEvent]) -> list[tuple[bytes | None, bytes | None]]:
    return [(e.conversation_id.encode(), e.to_json()) for e in events]


class TopicWatcher:
    """Reads a topic from the start in the background, so a test can wait on what has arrived so far."""

    def __init__(self, bootstrap: str, topic: str, *,
                 isolation_level: Literal["read_committed", "read_uncommitted"] = "read_committed") -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        # read_committed, as every downstream reader: an exactly-once worker's aborted outputs are never seen.
        self.isolation_level = isolation_level
        self.records: list[dict[str, Any]] = []
        self.keys: list[bytes | None] = []
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> TopicWatcher:
        self._consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
                                          enable_auto_commit=False, group_id=None,
                                          isolation_level=self.isolation_level)
        await self._consumer.start()
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    self.records.append(orjson.loads(r.value))
                    self.keys.append(r.key)

    def ids(self, key: str = "event_id") -> list[str]:
        return [r[key] for r in self.records]

    def distinct(self, key: str = "event_id") -> set[str]:
        return set(self.ids(key))

    async def wait(self, predicate: Callable[[TopicWatcher], bool], timeout: float = 60.0) -> None:
        def reached() -> bool:
            if self._task is not None and self._task.done():
                self._task.result()  # the reader died: say why instead of timing out
            return predicate(self)

        try:
            await wait_for(reached, timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.topic}: condition not reached with {len(self.records)} records") from None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()


async def scrape_metrics(port: int) -> dict[str, float]:
    """A worker's /metrics as {sample name with labels: value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return out


def counter_total(counter: Counter) -> float:
    """A labelled counter's count over all its label values (e.g. ``ctd_events_in`` over the partitions)."""
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


def scraped_total(scraped: dict[str, float], name: str) -> float:
    """``name``'s samples of a ``scrape_metrics`` answer, summed over their label values."""
    return sum(v for k, v in scraped.items() if k == name or k.startswith(name + "{"))


async def committed_lag(bootstrap: str, group: str, topic: str) -> int:
    """Records of ``topic`` the group has not committed past (0: every input is accounted for)."""
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not partitions:
            await consumer.topics()  # refresh metadata once
            partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = await consumer.end_offsets(partitions)
        return sum(ends[tp] - (committed[tp].offset if tp in committed else 0) for tp in partitions)
    finally:
        await consumer.stop()
        await admin.close()


def guard_settings(bootstrap: str, topics: TopicsConfig, cache_dir: Path, *, alerts: AlertsConfig | None = None,
                   **guard: Any) -> GuardSettings:
    suffix = uuid.uuid4().hex[:6]
    return GuardSettings(
        cache_dir=cache_dir,
        kafka=KafkaConfig(bootstrap_servers=bootstrap, session_timeout_ms=10_000, heartbeat_interval_ms=1_000),
        topics=topics,
        guard=GuardConfig(group_id=f"guard-{suffix}", http_host="127.0.0.1", http_port=0, commit_interval_s=0.2,
                          shutdown_deadline_s=10, max_wait_ms=20, retry_backoff_s=0.2, retry_backoff_max_s=0.5,
                          **guard),
        alerts=alerts or AlertsConfig(group_id=f"alerter-{suffix}"),
        signing=signing_config(),
    )


def review_requests(datasets_dir: Path, n: int) -> list[tuple[bytes, bytes]]:
    """``n`` review requests as (key, value); ``signed_review_requests`` adds the worker's signatures."""
    records = read_file(datasets_dir / "xstest.jsonl")[:n]
    out = []
    for i, record in enumerate(records):
        event = record_event(record, run_id="guard-test", index=i)
        request = ReviewRequest(event=event, p_unsafe=0.5, dv=0.1, reason="test", threshold=0.0,
                                bundle_version="b", model_version="m", requested_at=utcnow())
        out.append((event.conversation_id.encode(), request.to_json()))
    return out


Signed = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


def signed(values: list[tuple[bytes | None, bytes | None]], kind: str = "review_request", role: str = "worker",
           now: float | None = None) -> list[Signed]:
    """(key, value) pairs with the header ``role``'s key signs them with (as the worker publishes review
    requests)."""
    signer = role_signer(role)
    return [(k, v, signer.headers(kind, k, v or b"", now=now)) for k, v in values]  # type: ignore[arg-type]


async def produce_signed(bootstrap: str, topic: str, values: list[Signed]) -> None:
    """A plain producer writing records with the given headers."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value, headers in values:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


class WrappedExpert:
    """The real expert behind ``before_score``, where a test makes it fail its own way (down, hanging, wedged,
    refusing one input); counts the calls."""

    def __init__(self, inner: EncoderHeadExpert) -> None:
        self.inner = inner
        self.calls = 0

    @property
    def name(self) -> str:
        return self.inner.name

    def parameters_per_token(self) -> int:
        return self.inner.parameters_per_token()

    def before_score(self, conversations: Sequence[Conversation]) -> None:
        """Raise or block here to fail; returning lets the real expert answer."""

    def score(self, conversations: Sequence[Conversation]) -> npt.NDArray[np.float64]:
        self.calls += 1
        self.before_score(conversations)
        return self.inner.score(conversations)


async def start_guard(settings: GuardSettings, expert: Any) -> tuple[GuardProcess, asyncio.Task[None]]:
    """A guard service on ``expert``, ready (its task failing first fails the test with its exception)."""
    process = GuardProcess(settings, expert)
    return process, await _run_until_ready(process)
