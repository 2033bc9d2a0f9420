"""Every Grafana dashboard query, executed by a real Prometheus (the Debian package) that scraped live services.

The worker and the guard service (with the alerter) run as processes on the embedded broker with the settings of
docker/ctd.env (signing on) and audits on; 60 events are replayed, plus what the failure panels need to show
something: poison inputs (dead letters) and an unsigned review request and verdict (signature refusals). Each
panel query must parse and run; each must return data unless it is listed in MAY_BE_EMPTY with the reason.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml
from aiokafka import AIOKafkaProducer

from ctd_monitor.local.broker import LocalBroker
from ctd_monitor.local.child import WorkerProcess, write_worker_config
from tests.container.stack import free_port, http_get, stack_env
from tests.deploy.helpers import dashboard_targets
from tests.worker.helpers import (
    TopicWatcher,
    dataset_events,
    event_values,
    guard_settings,
    new_topics,
    produce_at_rate,
    produce_raw,
    review_requests,
    wait_for,
    worker_settings,
)
from worker.config import AlertsConfig, WorkerAuditConfig
from worker.events import AUDIT_HEADER

pytestmark = [pytest.mark.container, pytest.mark.kafka, pytest.mark.slow]

RATE_WINDOW = "2m"  # Grafana's $__rate_interval: the whole run fits in it
# (panel, refId) → why a healthy short run may leave it empty.
MAY_BE_EMPTY = {
    ("Budget enforcement", "B"): "the hard cap binds only under a delegation surge",
    ("Alert rate", "B"): "no harmful verdict was suppressed (dedupe, rate limit) in a short run",
    ("Expert unavailable", "B"): "the expert never failed",
}


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """Session-scoped and listed first, so a machine without it skips before the broker and models start."""
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip("prometheus not installed: the dashboard test needs it (apt-get install prometheus)")
    return found


def query(base: str, expr: str) -> dict[str, object]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, body = http_get(url, timeout=10)
    assert body, f"Prometheus answered {status} with no body for {expr!r}"
    return dict(json.loads(body))


def test_every_dashboard_query_returns_data(prometheus_binary: str, kafka_broker: LocalBroker, small_bundle: Path,
                                            expert_dir: Path,
                                            cache_dir: Path, datasets_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    binary = prometheus_binary
    for key, value in stack_env().items():  # the stack's keys and flags, as the containers get them
        monkeypatch.setenv(key, value)
    bootstrap = kafka_broker.bootstrap
    topics = new_topics(kafka_broker.create_topics)
    ws = worker_settings(bootstrap, small_bundle, cache_dir, topics=topics, group=f"prom-{time.time_ns()}")
    ws = ws.model_copy(update={"audit": WorkerAuditConfig(rate=0.3, settle_s=0.5, catch_up_timeout_s=10)})
    gs = guard_settings(bootstrap, topics, cache_dir, alerts=AlertsConfig(group_id=f"alerter-{time.time_ns()}"))
    gs = gs.model_copy(update={"expert": gs.expert.model_copy(update={
        "path": expert_dir, "encoder_head": gs.expert.encoder_head.model_copy(update={"dtype": "fp32"})})})
    worker = WorkerProcess(write_worker_config(tmp_path / "worker.yaml", ws), tmp_path / "worker.log").start()
    guard = WorkerProcess(write_worker_config(tmp_path / "guard.yaml", gs), tmp_path / "guard.log",
                          command="expert").start()
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        async def ports() -> tuple[int, int]:
            await wait_for(lambda: worker.http_port() is not None and guard.http_port() is not None, 180)
            wp, gp = worker.http_port(), guard.http_port()
            assert wp is not None and gp is not None
            await wait_for(lambda: all(http_get(f"http://127.0.0.1:{p}/healthz/ready")[0] == 200 for p in (wp, gp))
                           or not (worker.running() and guard.running()), 180)
            assert worker.running() and guard.running(), worker.log_tail() + guard.log_tail()
            return wp, gp

        worker_port, guard_port = asyncio.run(ports())
        web = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "ctd-worker", "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]},
                {"job_name": "ctd-guard", "static_configs": [{"targets": [f"127.0.0.1:{guard_port}"]}]},
            ],
        }))
        prometheus = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web}"],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))
        base = f"http://127.0.0.1:{web}"

        async def traffic() -> None:
            events = dataset_events([datasets_dir / "xstest.jsonl", datasets_dir / "harmbench.jsonl"], 60)
            watcher = await TopicWatcher(bootstrap, topics.verdicts).start()
            try:
                await produce_at_rate(bootstrap, topics.input, event_values(events), rate=15)
                await produce_raw(bootstrap, topics.input, [(b"poison", b"{not json"), (None, b"[]")])
                unsigned = review_requests(datasets_dir, 1)  # no signature header: the guard must refuse it
                await produce_raw(bootstrap, topics.review, unsigned)
                wanted = {e.event_id for e in events}

                def finished(w: TopicWatcher) -> bool:
                    final = {r["event_id"] for r in w.records
                             if r["source"] != "probe" or not r["delegated"]}
                    return wanted <= final

                await watcher.wait(finished, timeout=240)
                # An unsigned copy of a real audit verdict: the alerter and the worker's audit reader must refuse it.
                forged = next(r for r in watcher.records if r["source"] == "expert" and r.get("audit"))
                producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
                await producer.start()
                try:
                    await producer.send_and_wait(topics.verdicts, json.dumps(forged).encode(),
                                                 key=str(forged["conversation_id"]).encode(),
                                                 headers=[(AUDIT_HEADER, b"1")])
                finally:
                    await producer.stop()
            finally:
                await watcher.stop()

        asyncio.run(traffic())
        deadline = time.monotonic() + 60
        last = 'sum(ctd_audit_verdicts_skipped_total{job="ctd-worker",reason="bad_signature"})'
        while not query(base, last)["data"]["result"]:  # type: ignore[index]
            assert time.monotonic() < deadline, "Prometheus never scraped the worker's signature refusal"
            time.sleep(1)
        time.sleep(3)  # a few more scrapes after the last record

        empty, failed = [], []
        for title, ref, expr in dashboard_targets():
            answer = query(base, expr.replace("$__rate_interval", RATE_WINDOW))
            if answer.get("status") != "success":
                failed.append(f"{title}/{ref}: {answer.get('error')} in {expr}")
                continue
            result = answer["data"]["result"]  # type: ignore[index]
            if not result and (title, ref) not in MAY_BE_EMPTY:
                empty.append(f"{title}/{ref}: {expr}")
        assert not failed, "\n".join(failed)
        assert not empty, "panels without data:\n" + "\n".join(empty)

        def values(expr: str, label: str) -> set[str]:
            return {r["metric"].get(label, "") for r in query(base, expr)["data"]["result"]}  # type: ignore[index]

        # The breakdowns split what they should: every input partition (idle ones too), the stream's one tenant
        # (the plain input topic's: tenant.default), the worker's one budget scope.
        partitions = values('sum by (topic, partition) (ctd_events_in_total{job="ctd-worker"})', "partition")
        assert partitions == {"0", "1", "2"}
        assert values('sum by (tenant) (ctd_verdicts_out_total{job="ctd-worker"})', "tenant") == {"default"}
        assert values('sum by (tenant) (ctd_alerts_raised_total{job="ctd-guard"})', "tenant") == {"default"}
        assert values('max by (scope) (ctd_window_delegation_rate{job="ctd-worker"})', "scope") == {"worker"}
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        guard.terminate(30)
        worker.terminate(30)
