"""The real Kafka broker of the test session: one KRaft node from Maven Central jars, shared by every test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctd_monitor.local.broker import LocalBroker, resolve_cache_dir
from probes.config import ModelConfig
from probes.runtime.monitor import Monitor
from tests.worker.helpers import build_small_bundle, session_keys_dir


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that asks for the broker needs it whether or not its author remembered the marker, and
    # `-m "not kafka"` must deselect it; tryfirst so the marker exists before -m filters.
    for item in items:
        if {"kafka_broker", "kafka_topics"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    # The data dir is pytest's, not a private temp dir, so kafka.log survives a failed session for reading.
    broker = LocalBroker(cache_dir=resolve_cache_dir(), data_dir=tmp_path_factory.mktemp("kafka"))
    broker.start(timeout_s=120)
    try:
        yield broker
    finally:
        broker.stop()


class TopicFactory:
    """``kafka_topics(partitions, count=1)`` creates ``count`` fresh topics and returns their names."""

    def __init__(self, broker: LocalBroker, prefix: str) -> None:
        self._broker = broker
        self._prefix = prefix
        self.created: list[str] = []

    def __call__(
        self, partitions: int = 3, count: int = 1, *, config: dict[str, str] | None = None
    ) -> list[str]:
        names = [f"{self._prefix}-{uuid.uuid4().hex[:10]}" for _ in range(count)]
        self._broker.create_topics({name: partitions for name in names}, config=config)
        self.created.extend(names)
        return names


@pytest.fixture
def kafka_topics(kafka_broker: LocalBroker, request: pytest.FixtureRequest) -> TopicFactory:
    # Unique names instead of deleting topics: tests never see each other's records or committed offsets.
    prefix = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40].strip("-") or "t"
    return TopicFactory(kafka_broker, prefix)


@pytest.fixture(scope="session")
def small_bundle(tmp_path_factory: pytest.TempPathFactory, datasets_dir: Path, cache_dir: Path) -> Path:
    return build_small_bundle(tmp_path_factory.mktemp("bundle") / "b", datasets_dir, cache_dir)


@pytest.fixture(scope="session")
def monitor(small_bundle: Path, cache_dir: Path) -> Monitor:
    return Monitor(small_bundle, ModelConfig(spec="minilm-l6", dtype="fp32", max_tokens=64), cache_dir=cache_dir)


@pytest.fixture(autouse=True)
def _signing_keys(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every service a test builds, in this process or a child, finds real per-role keys: the secure default.

    A test that needs another signing set-up passes ``signing=`` explicitly (init values win over the env).
    """
    keys = session_keys_dir()
    monkeypatch.setenv("CTD_SIGNING__KEYS_DIR", str(keys))
    return keys
