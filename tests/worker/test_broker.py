"""The local Kafka broker itself: real JVM, real aiokafka clients."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from ctd_monitor.local.broker import (
    KAFKA_VERSION,
    BrokerError,
    LocalBroker,
    fetch_jars,
    kafka_home,
    resolve_cache_dir,
)
from tests.worker.conftest import TopicFactory

REPO = Path(__file__).resolve().parents[2]


async def _consume(
    bootstrap: str, topic: str, n: int, *, group: str | None, timeout: float = 30
) -> list[tuple[int, bytes, bytes]]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[tuple[int, bytes, bytes]] = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for tp, records in batches.items():
                out.extend((tp.partition, r.key or b"", r.value or b"") for r in records)
        if group is not None:
            await consumer.commit()
    finally:
        await consumer.stop()
    return out


@pytest.mark.kafka
async def test_produce_and_consume_back_across_three_partitions(
    kafka_broker: LocalBroker, kafka_topics: TopicFactory
) -> None:
    [topic] = kafka_topics(3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        sent = [(f"k{i % 6}".encode(), f"v{i}".encode()) for i in range(30)]
        for key, value in sent:
            await producer.send(topic, value, key=key)
        await producer.flush()
        partitions = await producer.partitions_for(topic)
    finally:
        await producer.stop()
    assert partitions == {0, 1, 2}

    got = await _consume(kafka_broker.bootstrap, topic, len(sent), group=f"g-{topic}")
    assert sorted(v for _, _, v in got) == sorted(v for _, v in sent)
    assert len({p for p, _, _ in got}) > 1, "six keys should spread over more than one partition"
    for key in {k for k, _ in sent}:
        # Per-key order survives partitioning: the guarantee the worker's commit logic relies on.
        assert [v for _, k, v in got if k == key] == [v for k, v in sent if k == key]
        assert len({p for p, k, _ in got if k == key}) == 1


@pytest.mark.kafka
async def test_create_topics_is_idempotent_and_applies_config(
    kafka_broker: LocalBroker, kafka_topics: TopicFactory
) -> None:
    [topic] = kafka_topics(3, config={"retention.ms": "3600000"})
    # Called again (from inside this test's running event loop), even with another partition count: no error,
    # and the existing topic is left alone.
    kafka_broker.create_topics({topic: 3})
    kafka_broker.create_topics({topic: 5})
    await kafka_broker.create_topics_async({topic: 3})

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
        [configs] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    assert len(described["partitions"]) == 3
    entries = {entry[0]: entry[1] for entry in configs.resources[0][4]}
    assert entries["retention.ms"] == "3600000"


@pytest.mark.kafka
def test_create_topics_reports_real_errors(kafka_broker: LocalBroker) -> None:
    with pytest.raises(BrokerError, match="creating topics failed"):
        kafka_broker.create_topics({"bad-partitions": 0})


@pytest.mark.kafka
async def test_a_produce_during_pause_completes_after_resume(
    kafka_broker: LocalBroker, kafka_topics: TopicFactory
) -> None:
    [topic] = kafka_topics(1)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_broker.bootstrap, acks="all", request_timeout_ms=60000
    )
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"before")  # metadata and connection ready before the freeze
        kafka_broker.pause()
        try:
            pending = asyncio.ensure_future(producer.send_and_wait(topic, b"during"))
            await asyncio.sleep(3)
            assert not pending.done(), "a frozen broker must not acknowledge anything"
        finally:
            kafka_broker.resume()
        meta = await asyncio.wait_for(pending, timeout=30)
        assert meta.offset == 1
    finally:
        await producer.stop()
    got = await _consume(kafka_broker.bootstrap, topic, 2, group=None)
    assert [v for _, _, v in got] == [b"before", b"during"]


def test_fetch_jars_is_cached(kafka_broker: LocalBroker) -> None:
    # kafka_broker already fetched them, so this must be a marker check, not another mvn run.
    started = time.monotonic()
    libs = fetch_jars(resolve_cache_dir())
    assert time.monotonic() - started < 0.5
    assert libs == kafka_home(resolve_cache_dir(), KAFKA_VERSION) / "libs"
    assert (libs / ".complete").is_file() and (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file()
    assert (libs / "log4j-slf4j-impl-2.24.3.jar").is_file(), (
        "without an SLF4J binding the broker logs nothing"
    )


def test_missing_maven_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(BrokerError, match="`mvn` was not found"):
        fetch_jars(tmp_path / "cache")
    assert not (tmp_path / "cache" / "kafka" / KAFKA_VERSION / "libs").exists()


@pytest.mark.kafka
def test_run_broker_forever_serves_until_sigterm(kafka_broker: LocalBroker, tmp_path: Path) -> None:
    # A second JVM, as `ctd-monitor broker` would run it; kafka_broker only guarantees the jars are cached.
    # Logs go to stderr as the CLI configures them: stdout carries only the JSON line scripts read.
    code = (
        "import sys; from pathlib import Path; from probes.logs import configure_logging; "
        "from ctd_monitor.local.broker import run_broker_forever; configure_logging('INFO'); "
        "sys.exit(run_broker_forever(Path(sys.argv[1]), None, False))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(resolve_cache_dir())],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read().decode() if proc.stderr else ""
        info = orjson.loads(line)
        assert info["bootstrap"].startswith("127.0.0.1:") and info["version"] == KAFKA_VERSION
        jvm_log = Path(info["log"])
        assert jvm_log.is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
        assert proc.stdout.read() == b"", "nothing but the one JSON line on stdout"
        assert not jvm_log.parent.exists(), "a broker on a private temp dir removes it when stopped"
    finally:
        if proc.poll() is None:
            proc.terminate()  # lets it stop its JVM and remove its temp dir; SIGKILL only as a last resort
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.kafka
def test_a_relative_data_dir_is_resolved_before_the_jvm_changes_directory(
    kafka_broker: LocalBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The JVM runs inside the data dir: a relative path (the demo's default runs/demo) must not be read from there.
    monkeypatch.chdir(tmp_path)
    with LocalBroker(cache_dir=resolve_cache_dir(), data_dir=Path("runs/kafka")) as broker:
        assert broker.data_dir == tmp_path / "runs" / "kafka"
        assert broker.bootstrap.startswith("127.0.0.1:")
        assert (tmp_path / "runs" / "kafka" / "server.properties").is_file()
