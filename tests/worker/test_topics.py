"""``ctd-monitor topics create`` and the missing-topic checks, against the real broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from ctd_monitor.cli import app
from ctd_monitor.local.broker import LocalBroker
from worker.config import KafkaConfig, TopicsConfig, WorkerConfig
from worker.topics import (
    AUDIT_RETENTION_MS,
    RETENTION_MS,
    TopicMissingError,
    create_topics,
    describe_topic_configs,
    max_message_bytes,
    missing_topics,
    require_topics,
    topic_specs,
)

REPO = Path(__file__).resolve().parents[2]


def _topic_env(monkeypatch: pytest.MonkeyPatch, topics: TopicsConfig) -> None:
    for key in [k for k in os.environ if k.startswith("CTD_")]:
        monkeypatch.delenv(key)
    for field, name in topics.model_dump().items():
        monkeypatch.setenv(f"CTD_TOPICS__{field.upper()}", name)


def test_specs_follow_the_settings() -> None:
    specs = {s.name: s for s in topic_specs(TopicsConfig(), WorkerConfig(max_event_bytes=200_000),
                                             input_partitions=12, output_partitions=6, replication_factor=3)}
    assert set(specs) == set(TopicsConfig().model_dump().values())
    assert specs["conversations"].partitions == 12 and specs["verdicts"].partitions == 6
    assert specs["ctd-dead-letter"].partitions == 1 and specs["ctd-alerts"].partitions == 1
    for spec in specs.values():
        assert spec.config["max.message.bytes"] == str(max_message_bytes(200_000)) == str(200_000 + 65_536)
        assert spec.config["min.insync.replicas"] == "2" and spec.replication_factor == 3
    assert "min.insync.replicas" not in topic_specs(TopicsConfig(), WorkerConfig())[0].config


def test_topics_create_makes_all_five_with_configs_and_is_idempotent(
    kafka_broker: LocalBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = TopicsConfig().suffixed(uuid.uuid4().hex[:8])
    _topic_env(monkeypatch, topics)
    monkeypatch.setenv("CTD_WORKER__MAX_EVENT_BYTES", "300000")
    kafka = KafkaConfig(bootstrap_servers=kafka_broker.bootstrap)
    names = list(topics.model_dump().values())
    assert asyncio.run(missing_topics(kafka, names)) == names
    runner = CliRunner()
    args = ["--no-progress", "topics", "create", "--partitions", "4", "--bootstrap", kafka_broker.bootstrap]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    created = {t["name"]: t for t in orjson.loads(first.stdout)["topics"]}
    assert set(created) == set(names) and all(t["created"] for t in created.values())
    assert asyncio.run(missing_topics(kafka, names)) == []
    configs = asyncio.run(describe_topic_configs(kafka, names))
    for name in names:
        assert configs[name]["max.message.bytes"] == str(300_000 + 65_536)
    assert configs[topics.input]["retention.ms"] == str(RETENTION_MS)
    assert configs[topics.dead_letter]["retention.ms"] == str(AUDIT_RETENTION_MS)
    partitions = {t["topic"]: len(t["partitions"]) for t in asyncio.run(_describe(kafka, names))}
    assert partitions[topics.input] == 4 and partitions[topics.verdicts] == 3 and partitions[topics.alerts] == 1

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert not any(t["created"] for t in orjson.loads(again.stdout)["topics"])


async def _describe(kafka: KafkaConfig, names: list[str]) -> list[dict[str, object]]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**kafka.client_kwargs())
    await admin.start()
    try:
        return list(await admin.describe_topics(names))
    finally:
        await admin.close()


def test_require_topics_names_the_missing_topic_and_the_command(kafka_broker: LocalBroker) -> None:
    name = f"nowhere-{uuid.uuid4().hex[:8]}"
    with pytest.raises(TopicMissingError) as info:
        asyncio.run(require_topics(KafkaConfig(bootstrap_servers=kafka_broker.bootstrap), [name]))
    message = str(info.value)
    assert name in message and f"ctd-monitor topics create --bootstrap {kafka_broker.bootstrap}" in message


def test_replay_to_a_missing_topic_is_a_one_line_error(kafka_broker: LocalBroker, datasets_dir: Path) -> None:
    """The README's `replay` on a fresh broker used to die with a raw UnknownTopicOrPartitionError traceback."""
    name = f"conversations-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTD_")}
    env.update(CTD_TOPICS__INPUT=name, PYTHONPATH=str(REPO), COLUMNS="200")
    proc = subprocess.run(
        [sys.executable, "-m", "ctd_monitor.cli", "--no-progress", "replay", "--data",
         str(datasets_dir / "xstest.jsonl"), "--limit", "3", "--bootstrap", kafka_broker.bootstrap],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO, check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    output = (proc.stdout + proc.stderr).strip()
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and name in errors[0] and "ctd-monitor topics create" in errors[0], output


def test_topics_create_without_a_broker_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("CTD_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("CTD_KAFKA__REQUEST_TIMEOUT_MS", "2000")
    result = CliRunner().invoke(app, ["--no-progress", "topics", "create", "--bootstrap", "127.0.0.1:1"])
    assert result.exit_code == 2 and "cannot reach Kafka at 127.0.0.1:1" in result.output, result.output


async def test_a_worker_without_its_topics_says_so_once_and_waits(
    kafka_broker: LocalBroker, small_bundle: Path, cache_dir: Path, monitor: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    """On a fresh broker the worker used to exit with a raw UnknownTopicOrPartitionError after a minute."""
    from tests.worker.helpers import wait_for, worker_settings
    from worker.monitor import monitor_stream

    topics = TopicsConfig().suffixed(uuid.uuid4().hex[:8])
    s = worker_settings(kafka_broker.bootstrap, small_bundle, cache_dir, topics=topics,
                        group=f"g-{uuid.uuid4().hex[:6]}")
    stream = monitor_stream(s, monitor)
    task = asyncio.create_task(stream.run())
    await asyncio.sleep(8)  # more than one check interval
    assert not task.done() and not stream.ready()
    await create_topics(KafkaConfig(bootstrap_servers=kafka_broker.bootstrap), topic_specs(topics, s.worker))
    await wait_for(lambda: stream.ready() or task.done(), timeout=60)
    assert stream.ready()
    stream.stop()
    await asyncio.wait_for(task, 30)
    lines = [line for line in capfd.readouterr().err.splitlines() if '"topics.missing"' in line]
    assert len(lines) == 1, lines
    assert topics.input in lines[0] and "ctd-monitor topics create" in lines[0]
