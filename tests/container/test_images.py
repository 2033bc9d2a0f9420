"""The CPU worker and guard images built with podman and run as deploy/ runs them, against the real broker.

Both containers use the host's network (the embedded broker listens on 127.0.0.1), mount the probe bundle, the
MiniLM weights and the expert read-only, run as user 10001 on a read-only root filesystem with /tmp the only
writable path. 50 replayed events must each get a final verdict (the expert's when delegated); then the worker
container gets SIGTERM with events still arriving and must drain and exit within its shutdown deadline, leaving no
committed event without a verdict.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest

from ctd_monitor.local.broker import LocalBroker
from ctd_monitor.local.child import write_worker_config
from tests.container.conftest import MINILM_MOUNT
from tests.container.stack import Container, free_port, run_service
from tests.worker.helpers import (
    TopicWatcher,
    committed_lag,
    dataset_events,
    event_values,
    guard_settings,
    new_topics,
    produce_at_rate,
    worker_settings,
)
from worker.config import AlertsConfig, TopicsConfig

pytestmark = [pytest.mark.container, pytest.mark.kafka, pytest.mark.slow]

SHUTDOWN_DEADLINE_S = 10.0
# What the container engine adds to the service's own drain: signal delivery, runc tearing the container down.
ENGINE_SLACK_S = 5.0


def final_ids(verdicts: list[dict[str, object]]) -> set[str]:
    """Events with a final verdict: an undelegated probe verdict, or the guard's (expert or fail-closed) one."""
    out = set()
    for v in verdicts:
        if v["source"] != "probe" or not v["delegated"]:
            out.add(str(v["event_id"]))
    return out


def start_worker(image: str, topics: TopicsConfig, bootstrap: str, bundle: Path, minilm: Path, cache_dir: Path,
                 tmp: Path, group: str) -> Container:
    port = free_port()
    settings = worker_settings(bootstrap, bundle, cache_dir, topics=topics, group=group, http_port=port,
                               shutdown_deadline_s=SHUTDOWN_DEADLINE_S)
    config = write_worker_config(tmp / f"{group}.yaml", settings)
    config.chmod(0o644)
    return run_service(image, f"ctd-test-{group}", ["run", "--bundle", "/models/bundle"], port=port, config=config,
                       mounts={bundle: "/models/bundle", minilm: MINILM_MOUNT},
                       env={"CTD_CACHE_DIR": "/opt/ctd-cache"})


def start_guard(image: str, topics: TopicsConfig, bootstrap: str, expert: Path, cache_dir: Path,
                tmp: Path) -> Container:
    port = free_port()
    suffix = uuid.uuid4().hex[:6]
    settings = guard_settings(bootstrap, topics, cache_dir, alerts=AlertsConfig(group_id=f"alerter-{suffix}"))
    expert_cfg = settings.expert.model_copy(update={
        "path": Path("/models/expert"),
        "encoder_head": settings.expert.encoder_head.model_copy(update={"dtype": "fp32"})})
    settings = settings.model_copy(update={"guard": settings.guard.model_copy(update={"http_port": port}),
                                           "expert": expert_cfg})
    config = write_worker_config(tmp / f"guard-{suffix}.yaml", settings)
    config.chmod(0o644)
    return run_service(image, f"ctd-test-guard-{suffix}", ["expert"], port=port, config=config,
                       mounts={expert: "/models/expert"},
                       env={"CTD_CACHE_DIR": "/opt/ctd-cache"})


def test_images_replay_and_drain(images: dict[str, str], kafka_broker: LocalBroker, mounted_bundle: Path,
                                 mounted_expert: Path, mounted_minilm: Path, cache_dir: Path, datasets_dir: Path,
                                 tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    bootstrap = kafka_broker.bootstrap
    topics = new_topics(kafka_broker.create_topics)
    group = f"worker-{uuid.uuid4().hex[:6]}"
    files = [datasets_dir / "xstest.jsonl", datasets_dir / "harmbench.jsonl"]
    events = dataset_events(files, 50)
    late = dataset_events(files, 80, run_id=uuid.uuid4().hex[:12])[50:]
    worker = start_worker(images["cpu"], topics, bootstrap, mounted_bundle, mounted_minilm, cache_dir, tmp_path,
                          group)
    guard = start_guard(images["guard"], topics, bootstrap, mounted_expert, cache_dir, tmp_path)
    try:
        cold_start = worker.wait_ready(240)
        guard.wait_ready(240)

        # As deploy/ declares: numeric non-root user, read-only root filesystem.
        for c in (worker, guard):
            assert c.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
            assert c.exec("id", "-u").stdout.strip() == "10001"
            denied = c.exec("python", "-c", "open('/opt/venv/written', 'w')")
            assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied.stderr
            assert c.exec("python", "-c", "open('/tmp/written', 'w')").returncode == 0

        async def replay_and_drain() -> dict[str, float]:
            watcher = await TopicWatcher(bootstrap, topics.verdicts).start()
            try:
                t0 = time.monotonic()
                await produce_at_rate(bootstrap, topics.input, event_values(events))
                wanted = {e.event_id for e in events}
                await watcher.wait(lambda w: wanted <= final_ids(w.records), timeout=180)
                replay_s = time.monotonic() - t0
                probe = [r for r in watcher.records if r["source"] == "probe"]
                assert {r["event_id"] for r in probe} >= wanted
                delegated = {r["event_id"] for r in probe if r["delegated"]} & wanted
                assert delegated, "the small bundle delegates ~a third: the guard container must have answered"
                assert {r["event_id"] for r in watcher.records if r["source"] != "probe"} >= delegated

                # SIGTERM with traffic still arriving: drain, commit, leave, all within the deadline.
                await produce_at_rate(bootstrap, topics.input, event_values(late))
                await asyncio.sleep(0.5)
                sent = time.monotonic()
                worker.signal("TERM")
                code = await asyncio.to_thread(worker.wait, SHUTDOWN_DEADLINE_S + ENGINE_SLACK_S + 20)
                drain_s = time.monotonic() - sent
                assert code == 0, worker.logs()[-4000:]
                assert drain_s <= SHUTDOWN_DEADLINE_S + ENGINE_SLACK_S, f"drained in {drain_s:.1f} s"
                await asyncio.sleep(1.0)  # let the watcher read what the drain published
                with_verdict = {r["event_id"] for r in watcher.records if r["source"] == "probe"}
                missing = {e.event_id for e in late} - with_verdict
                lag = await committed_lag(bootstrap, group, topics.input)
                # At-least-once: an event without a verdict must still be uncommitted (its partition's next owner
                # redoes it); none may be committed and lost.
                assert len(missing) <= lag, f"{len(missing)} late events without a verdict, committed lag {lag}"
                return {"replay_s": replay_s, "drain_s": drain_s, "late_without_verdict": len(missing)}
            finally:
                await watcher.stop()

        figures = asyncio.run(replay_and_drain())
        logs = worker.logs()
        assert "partitions.assigned" in logs or "ready" in logs
        print(json.dumps({"worker_cold_start_s": round(cold_start, 1),
                          **{k: round(v, 2) for k, v in figures.items()}}))
    finally:
        worker.remove()
        guard.remove()
