"""Cross-references: manifests against each other and against the code's settings, health routes and commands."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from ctd_monitor.cli import app
from probes.config import Settings, load_settings
from tests.deploy.conftest import VARIANTS
from tests.deploy.helpers import DEPLOY, Doc, field_path, named, of_kind, selects
from worker.__main__ import parser
from worker.config import GuardSettings, WorkerSettings
from worker.health import HealthServer
from worker.topics import topic_specs

# The command each Deployment runs → its settings class (the guard's `expert` command is GuardSettings by contract).
COMMANDS: dict[str, type[Settings]] = {"run": WorkerSettings, "expert": GuardSettings}
PLACEHOLDER = "from-the-cluster"  # value for env taken from Secrets or the downward API


def container(dep: Doc) -> dict[str, Any]:
    (only,) = dep["spec"]["template"]["spec"]["containers"]
    return dict(only)


def command_of(dep: Doc) -> str:
    args = container(dep)["args"]
    commands = [a for a in args if a in COMMANDS]
    assert len(commands) == 1, f"{dep['metadata']['name']}: one of {sorted(COMMANDS)} expected in {args}"
    return str(commands[0])


def effective_settings(docs: list[Doc], dep: Doc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Load the Deployment's settings as the pod would: its --config file from the mounted ConfigMap + its env."""
    c = container(dep)
    args = c["args"]
    config_path = Path(args[args.index("--config") + 1])
    mount = next(m for m in c["volumeMounts"] if config_path.is_relative_to(m["mountPath"]))
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    cm = named(docs, "ConfigMap", volume["configMap"]["name"])
    local = tmp_path / f"{dep['metadata']['name']}.yaml"
    local.write_text(cm["data"][str(config_path.relative_to(mount["mountPath"]))])
    for key in [k for k in os.environ if k.startswith("CTD_")]:
        monkeypatch.delenv(key)
    for env in c.get("env", []):
        monkeypatch.setenv(env["name"], str(env.get("value", PLACEHOLDER)))
    return load_settings(local, cls=COMMANDS[command_of(dep)])


@pytest.mark.parametrize("variant", VARIANTS)
def test_env_names_are_settings_fields(renders: dict[str, list[Doc]], variant: str) -> None:
    for dep in of_kind(renders[variant], "Deployment"):
        cls = COMMANDS[command_of(dep)]
        names = [e["name"] for e in container(dep).get("env", [])]
        assert len(names) == len(set(names)), f"duplicate env in {dep['metadata']['name']}: {names}"
        for name in names:
            assert field_path(cls, name) is not None, f"{dep['metadata']['name']}: {name} is no {cls.__name__} field"


def test_field_path_rejects_unknown_names() -> None:
    assert field_path(WorkerSettings, "CTD_KAFKA__SASL_PASSWORD") == ["kafka", "sasl_password"]
    assert field_path(WorkerSettings, "CTD_KAFKA__SASL_PASSWD") is None
    assert field_path(WorkerSettings, "CTD_GUARD__GROUP_ID") is None  # a GuardSettings section
    assert field_path(GuardSettings, "CTD_GUARD__GROUP_ID") == ["guard", "group_id"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_files_and_env_load_as_settings(
    renders: dict[str, list[Doc]], variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = renders[variant]
    worker = effective_settings(docs, named(docs, "Deployment", "ctd-worker"), tmp_path, monkeypatch)
    guard = effective_settings(docs, named(docs, "Deployment", "ctd-guard"), tmp_path, monkeypatch)
    assert isinstance(worker, WorkerSettings) and isinstance(guard, GuardSettings)
    assert worker.worker.bundle == Path("/models/bundle")
    assert guard.expert.backend == "openai-compatible"
    if variant.startswith("gpu"):
        assert worker.model.device == "cuda"
        assert worker.batching.max_batch_tokens >= 32768, "GPU throughput needs >= 32k-token batches"
    else:
        assert worker.model.device == "cpu"
    if variant.endswith("+components"):
        assert worker.kafka.security_protocol == guard.kafka.security_protocol == "SASL_SSL"
        assert worker.kafka.sasl_password is not None
    else:
        assert worker.kafka.security_protocol == "PLAINTEXT"


def test_unknown_config_keys_are_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((DEPLOY / "base/config/worker.yaml").read_text().replace("max_in_flight", "max_inflight"))
    with pytest.raises(Exception, match="max_inflight"):
        load_settings(bad, cls=WorkerSettings)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ports_probes_services_and_monitors_line_up(
    renders: dict[str, list[Doc]], variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = renders[variant]
    health = HealthServer(host="127.0.0.1", port=0, registry=CollectorRegistry(), ready=lambda: True,
                          live=lambda: (True, "ok"))
    for dep in of_kind(docs, "Deployment"):
        name = dep["metadata"]["name"]
        settings = effective_settings(docs, dep, tmp_path, monkeypatch)
        section = settings.worker if isinstance(settings, WorkerSettings) else settings.guard  # type: ignore[attr-defined]
        c = container(dep)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert list(ports.values()) == [section.http_port], f"{name}: container port vs settings http_port"
        probes = {kind: c[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
        assert probes["readinessProbe"]["httpGet"]["path"] == "/healthz/ready"
        assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz/live", "liveness must be progress-based"
        for kind, probe in probes.items():
            assert probe["httpGet"]["port"] in ports, f"{name}: {kind} port"
            assert health._route(probe["httpGet"]["path"])[0].startswith("200"), f"{name}: {kind} path not served"
        # Grace period above the shutdown deadline (drain, flush, commit, leave) with room for the kubelet.
        grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= section.shutdown_deadline_s + 10, f"{name}: terminationGracePeriodSeconds {grace}"
        # Services select the pods and target a named container port; ServiceMonitors select the Services.
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selects(dep["spec"]["selector"]["matchLabels"], pod_labels)
        (svc,) = [s for s in of_kind(docs, "Service") if selects(s["spec"]["selector"], pod_labels)]
        svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
        for p in svc_ports.values():
            assert p["targetPort"] in ports, f"{svc['metadata']['name']}: targetPort {p['targetPort']}"
        (monitor,) = [m for m in of_kind(docs, "ServiceMonitor")
                      if selects(m["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in svc_ports
            assert health._route(endpoint["path"])[0].startswith("200")
        (pdb,) = [p for p in of_kind(docs, "PodDisruptionBudget")
                  if selects(p["spec"]["selector"]["matchLabels"], pod_labels)]
        assert pdb["spec"]["maxUnavailable"] == 1
        # The Deployment's command exists in the CLI and in the images' entry (python -m worker) alike.
        registered = {cmd.name or (cmd.callback.__name__ if cmd.callback else "") for cmd in app.registered_commands}
        assert command_of(dep) in registered
        assert parser().parse_args(container(dep)["args"]).command == command_of(dep)


def topic_partitions() -> dict[str, int]:
    docs = list(yaml.safe_load_all((DEPLOY / "components/strimzi-topics/topics.yaml").read_text()))
    return {d["spec"].get("topicName", d["metadata"]["name"]): d["spec"]["partitions"] for d in docs}


@pytest.mark.parametrize("variant", VARIANTS)
def test_scaledobjects_watch_the_consumer_groups_the_pods_use(
    renders: dict[str, list[Doc]], variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = renders[variant]
    partitions = topic_partitions()
    if variant.endswith("+components"):
        rendered = {d["metadata"]["name"]: d["spec"]["partitions"] for d in of_kind(docs, "KafkaTopic")}
        assert rendered == partitions
        auths = {a["metadata"]["name"] for a in of_kind(docs, "TriggerAuthentication")}
    for scaled in of_kind(docs, "ScaledObject"):
        target = scaled["spec"]["scaleTargetRef"]
        dep = named(docs, target["kind"], target["name"])
        s = effective_settings(docs, dep, tmp_path, monkeypatch)
        if isinstance(s, WorkerSettings):
            expected = {(s.kafka.group_id, s.topics.input)}
        else:
            assert isinstance(s, GuardSettings)
            expected = {(s.guard.group_id, s.topics.review), (s.alerts.group_id, s.topics.verdicts)}
        triggers = scaled["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"kafka"}
        assert {(t["metadata"]["consumerGroup"], t["metadata"]["topic"]) for t in triggers} == expected
        for t in triggers:
            meta = t["metadata"]
            assert meta["bootstrapServers"] == s.kafka.bootstrap_servers
            assert meta["allowIdleConsumers"] == "false"
            assert int(meta["lagThreshold"]) > 0
            # No more consumers than partitions: the extra ones would idle and only add rebalances.
            assert scaled["spec"]["maxReplicaCount"] <= partitions[meta["topic"]], meta["topic"]
            if variant.endswith("+components"):
                assert t["authenticationRef"]["name"] in auths
            else:
                assert "authenticationRef" not in t
        assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]


def test_topic_component_names_every_topic_of_the_settings() -> None:
    assert set(topic_partitions()) == set(WorkerSettings().topics.model_dump().values())


def test_topic_configs_match_what_topics_create_sets(
    renders: dict[str, list[Doc]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max.message.bytes (and the rest) as `ctd-monitor topics create` would set them for the deployed worker's
    settings: an event the worker accepts, its review request and its dead letter always fit."""
    docs = renders["gpu+components"]
    worker = effective_settings(docs, named(docs, "Deployment", "ctd-worker"), tmp_path, monkeypatch)
    assert isinstance(worker, WorkerSettings)
    topics = {d["spec"].get("topicName", d["metadata"]["name"]): d["spec"] for d in of_kind(docs, "KafkaTopic")}
    specs = topic_specs(worker.topics, worker.worker, replication_factor=3)
    assert set(topics) == {s.name for s in specs}
    for spec in specs:
        assert topics[spec.name]["replicas"] == spec.replication_factor
        config = {k: str(v) for k, v in topics[spec.name]["config"].items()}
        assert config == spec.config, spec.name
        assert int(config["max.message.bytes"]) >= worker.worker.max_event_bytes + 65_536


def _ports(rule: dict[str, Any]) -> set[object]:
    return {p["port"] for p in rule.get("ports", [])}


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policies_let_each_pod_do_its_job_and_nothing_else(
    renders: dict[str, list[Doc]], variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = renders[variant]
    policies = of_kind(docs, "NetworkPolicy")
    for dep in of_kind(docs, "Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        mine = [p for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], labels)]
        assert len(mine) == 1, f"{dep['metadata']['name']}: one NetworkPolicy expected"
        spec = mine[0]["spec"]
        assert set(spec["policyTypes"]) == {"Ingress", "Egress"}, "default-deny both ways"
        port_names = {p["name"] for p in container(dep)["ports"]}
        ingress_ports = set().union(*(_ports(r) for r in spec["ingress"]))
        assert ingress_ports and ingress_ports <= port_names, "only the metrics/health port is reachable"
        settings = effective_settings(docs, dep, tmp_path, monkeypatch)
        egress_ports = set().union(*(_ports(r) for r in spec["egress"]))
        kafka_ports = {int(s.rsplit(":", 1)[1]) for s in settings.kafka.bootstrap_servers.split(",")}  # type: ignore[attr-defined]
        assert kafka_ports <= egress_ports and 53 in egress_ports
        if isinstance(settings, GuardSettings) and settings.expert.backend == "openai-compatible":
            port = httpx.URL(settings.expert.openai.base_url).port
            assert port in egress_ports, "the guard reaches its expert endpoint"


@pytest.mark.parametrize("variant", VARIANTS)
def test_signing_keys_come_from_secrets_per_role_and_nothing_runs_insecure(
    renders: dict[str, list[Doc]], variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each Deployment mounts, at signing.keys_dir, its own role's private key (Secret ctd-signing-<role>, never
    another role's) and the public keys it verifies (Secret ctd-signing-public); insecure_dev stays off."""
    docs = renders[variant]
    roles = {"run": ("worker", {"guard.pub"}), "expert": ("guard", {"worker.pub", "guard.pub"})}
    for dep in of_kind(docs, "Deployment"):
        assert not any(e["name"].startswith("CTD_SIGNING__INSECURE") for e in container(dep).get("env", []))
        settings = effective_settings(docs, dep, tmp_path, monkeypatch)
        signing = settings.signing  # type: ignore[attr-defined]
        assert not signing.insecure_dev and signing.keys_dir is not None
        mount = next(m for m in container(dep)["volumeMounts"] if Path(m["mountPath"]) == signing.keys_dir)
        volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        files = {item["path"]: source["secret"]["name"] for source in volume["projected"]["sources"]
                 for item in source["secret"]["items"]}
        role, public = roles[command_of(dep)]
        assert files.pop(f"{role}.key") == f"ctd-signing-{role}"
        assert not any(path.endswith(".key") for path in files), "no other role's private key"
        assert {p for p, secret in files.items() if secret == "ctd-signing-public"} == public
        if role == "worker":
            assert files["audit.secret"] == "ctd-signing-worker"
