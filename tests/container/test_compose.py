"""The compose stack up and down with podman-compose: broker, topics job, worker, guard (with the alerter) and
Prometheus, from docker/compose.yaml plus docker/compose.local.yaml (the registry-less stand-ins for the Kafka and
Prometheus images). The test's own override only swaps in the small MiniLM bundle and expert of the other tests.
Replayed events get final verdicts through the stack, and Prometheus scrapes both services.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

from tests.container.conftest import MINILM_MOUNT
from tests.container.stack import DOCKER, REPO, http_get
from tests.worker.helpers import TopicWatcher, dataset_events, event_values, produce_at_rate

pytestmark = [pytest.mark.container, pytest.mark.slow]

PROJECT = "ctd-compose-test"
HOST_BOOTSTRAP = "127.0.0.1:29092"


def compose_command() -> list[str]:
    exe = shutil.which("podman-compose") or str(Path(sys.executable).parent / "podman-compose")
    if not Path(exe).is_file():
        pytest.skip("podman-compose not installed (dev extras): the compose test needs it")
    return [exe, "--project-name", PROJECT]


def test_compose_stack_up_and_down(images: dict[str, str], mounted_bundle: Path, mounted_expert: Path,
                                   mounted_minilm: Path, datasets_dir: Path, tmp_path: Path) -> None:
    base = compose_command()
    stand_ins = subprocess.run([str(REPO / "scripts" / "images.sh"), "kafka", "prometheus"], capture_output=True,
                               text=True, timeout=1800, check=False)
    assert stand_ins.returncode == 0, stand_ins.stderr[-4000:]
    override = tmp_path / "compose.test.yaml"
    override.write_text(yaml.safe_dump({"services": {
        "worker": {"environment": {"CTD_MODEL__DTYPE": "fp32"},
                   "volumes": [f"{mounted_minilm}:{MINILM_MOUNT}:ro"]},
        "guard": {"environment": {"CTD_EXPERT__ENCODER_HEAD__DTYPE": "fp32"}},
    }}))
    files = ["-f", str(DOCKER / "compose.yaml"), "-f", str(DOCKER / "compose.local.yaml"), "-f", str(override)]
    env = dict(os.environ, CTD_BUNDLE_DIR=str(mounted_bundle), CTD_EXPERT_DIR=str(mounted_expert))
    services = ["kafka", "topics", "keys", "worker", "guard", "prometheus"]

    def compose(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *files, *args], capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)

    def logs() -> str:
        return "\n".join(compose("logs", "--tail", "30", name, timeout=60).stdout for name in services)

    def up(*names: str) -> None:
        done = compose("up", "-d", *names)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def container(name: str) -> str:
        return f"{PROJECT}_{name}_1"

    def podman(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120, check=False)

    try:
        # podman-compose 1.6 on podman 4.3 does not await `condition: service_healthy` (podman lacks it) and
        # recreates dependencies on each `up`, so the test (and README) brings the stack up in the order the
        # conditions state, each step with --no-deps: broker healthy, topics and keys jobs completed, then the
        # services.
        up("kafka")
        deadline = time.monotonic() + 180
        while podman("healthcheck", "run", container("kafka")).returncode != 0:
            assert time.monotonic() < deadline, "broker never healthy:\n" + logs()
            time.sleep(3)
        up("--no-deps", "topics")
        assert podman("wait", container("topics")).stdout.strip() == "0", "topics job failed:\n" + logs()
        up("--no-deps", "keys")
        assert podman("wait", container("keys")).stdout.strip() == "0", "keys job failed:\n" + logs()
        up("--no-deps", "worker", "guard", "prometheus")
        deadline = time.monotonic() + 300
        while not all(http_get(f"http://127.0.0.1:{port}/healthz/ready")[0] == 200 for port in (8080, 8081)):
            assert time.monotonic() < deadline, "worker and guard not ready:\n" + logs()
            time.sleep(1)

        events = dataset_events([datasets_dir / "xstest.jsonl"], 20)

        async def replay() -> None:
            watcher = await TopicWatcher(HOST_BOOTSTRAP, "verdicts").start()
            try:
                await produce_at_rate(HOST_BOOTSTRAP, "conversations", event_values(events))
                wanted = {e.event_id for e in events}
                await watcher.wait(lambda w: wanted <= {r["event_id"] for r in w.records
                                                        if r["source"] != "probe" or not r["delegated"]}, 180)
            finally:
                await watcher.stop()

        asyncio.run(replay())
        deadline = time.monotonic() + 90
        query = urllib.parse.urlencode({"query": 'sum by (job) (ctd_events_in_total) > 0 or '
                                                 'sum by (job) (ctd_expert_requests_in_total) > 0'})
        while True:
            body = http_get(f"http://127.0.0.1:9090/api/v1/query?{query}", timeout=5)[1]
            jobs = {r["metric"]["job"] for r in json.loads(body)["data"]["result"]} if body else set()
            if jobs >= {"ctd-worker", "ctd-guard"}:
                break
            assert time.monotonic() < deadline, f"Prometheus scraped only {jobs}:\n" + logs()
            time.sleep(2)
    finally:
        down = compose("down", "--timeout", "30")
    assert down.returncode == 0, down.stderr[-3000:]
    left = subprocess.run(["podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}",
                           "--format", "{{.Names}}"], capture_output=True, text=True, timeout=60, check=True)
    assert left.stdout.strip() == "", f"containers left after down: {left.stdout}"
