"""The Grafana dashboard: every query names metrics and labels the services export, it covers what operators
watch, and it ships both as the sidecar-labelled ConfigMap and in the compose stack's Grafana provisioning.

tests/container/test_prometheus.py runs every query against a real Prometheus scraping live services."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.deploy.conftest import VARIANTS
from tests.deploy.helpers import DASHBOARD, DOCKER, Doc, dashboard_targets, named, promql_selectors
from tests.deploy.test_alerts import EXPORTED, TARGET_LABELS

# What the dashboard must show (issue 24) → metrics at least one panel must query for it.
COVERAGE = {
    "throughput": {"ctd_events_in_total", "ctd_verdicts_out_total"},
    "lag per partition": {"ctd_consumer_lag"},
    "delegation rate vs alpha": {"ctd_window_delegation_rate", "ctd_delegation_budget"},
    "verdict mix": {"ctd_verdicts_out_total", "ctd_expert_verdicts_out_total"},
    "alert rate": {"ctd_alerts_raised_total"},
    "expert latency": {"ctd_expert_latency_seconds_bucket"},
    "expert unavailable": {"ctd_expert_degraded", "ctd_expert_errors_total"},
    "dead letters": {"ctd_dead_letters_total", "ctd_alerter_dead_letters_total"},
    "signature refusals": {"ctd_audit_verdicts_skipped_total"},
    "recalibration version and cut": {"ctd_recalibration_version", "ctd_recalibration_cut"},
}


# Breakdowns issue 24 asks for → (metric, label) that some panel must aggregate ``by``.
BREAKDOWNS = {
    "throughput per partition": ("ctd_events_in_total", "partition"),
    "lag per partition": ("ctd_consumer_lag", "partition"),
    "delegation rate per scope": ("ctd_window_delegation_rate", "scope"),
    "verdict mix per tenant": ("ctd_verdicts_out_total", "tenant"),
    "alert rate per tenant": ("ctd_alerts_raised_total", "tenant"),
    "dead letters by stage and reason": ("ctd_dead_letters_total", "stage"),
}


def test_every_query_uses_exported_metrics_and_labels() -> None:
    targets = dashboard_targets()
    assert len(targets) >= 20
    for title, ref, expr in targets:
        selectors = list(promql_selectors(expr.replace("$__rate_interval", "5m")))
        assert selectors, f"{title}/{ref}: no metric in {expr!r}"
        for metric, labels in selectors:
            job = labels.get("job")
            registries = [EXPORTED[job]] if job else list(EXPORTED.values())
            owners = [reg for reg in registries if metric in reg]
            assert owners, f"{title}/{ref}: {metric} is not exported by {job or 'any service'}"
            for label in set(labels) - TARGET_LABELS:
                assert any(label in reg[metric] for reg in owners), f"{title}/{ref}: {metric} has no label {label}"


def test_dashboard_covers_what_operators_watch() -> None:
    queried = {metric for _, _, expr in dashboard_targets()
               for metric, _ in promql_selectors(expr.replace("$__rate_interval", "5m"))}
    missing = {what: sorted(metrics - queried) for what, metrics in COVERAGE.items() if not metrics <= queried}
    assert not missing
    signature = [expr for _, _, expr in dashboard_targets() if 'reason="bad_signature"' in expr]
    assert len(signature) >= 3, "refusals at the guard, the alerter and the worker's audit reader"


def test_dashboard_breaks_down_by_partition_scope_tenant_and_stage() -> None:
    grouped = {(metric, label) for _, _, expr in dashboard_targets()
               for metric, _ in promql_selectors(expr.replace("$__rate_interval", "5m"))
               for by in re.findall(r"\bby \(([^)]*)\)", expr) for label in re.split(r"\s*,\s*", by.strip())}
    missing = {what: pair for what, pair in BREAKDOWNS.items() if pair not in grouped}
    assert not missing
    for metric, label in BREAKDOWNS.values():  # the label is the code's, not only the dashboard's
        assert any(label in reg.get(metric, ()) for reg in EXPORTED.values()), (metric, label)


def test_panels_are_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "ctd-monitor" and dash["templating"]["list"][0]["type"] == "datasource"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["description"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs))


@pytest.mark.parametrize("variant", VARIANTS)
def test_dashboard_ships_as_a_sidecar_configmap(renders: dict[str, list[Doc]], variant: str) -> None:
    cm = named(renders[variant], "ConfigMap", "ctd-monitor-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["ctd-monitor.json"]) == json.loads(DASHBOARD.read_text())


def test_compose_provisions_the_same_dashboard() -> None:
    grafana = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["grafana"]
    mounts = {m.split(":")[1]: (DOCKER / m.split(":")[0]).resolve() for m in grafana["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    providers = yaml.safe_load((provisioning / "dashboards" / "ctd-monitor.yaml").read_text())["providers"]
    folder = providers[0]["options"]["path"]
    assert mounts[folder] == DASHBOARD.parent.resolve()
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasources[0]["type"] == "prometheus" and datasources[0]["url"] == "http://prometheus:9090"
