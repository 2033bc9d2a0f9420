"""PrometheusRule expressions only use metrics (and labels) the worker and the guard service export."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.helpers import Doc, exported_names, named, promql_selectors
from worker.metrics import AlerterMetrics, GuardMetrics, WorkerMetrics

# Labels Prometheus adds at scrape time (ServiceMonitor target labels), not the code.
TARGET_LABELS = frozenset({"job", "namespace", "pod", "instance", "service", "container", "endpoint"})

def _guard_process() -> dict[str, frozenset[str]]:
    """The guard pod serves the guard's and the alerter's metrics from one registry (worker/main.GuardProcess)."""
    guard = GuardMetrics()
    return {**exported_names(guard), **exported_names(AlerterMetrics(registry=guard.registry))}


EXPORTED = {"ctd-worker": exported_names(WorkerMetrics()), "ctd-guard": _guard_process()}
# The alert list → the rules that cover it.
REQUIRED_ALERTS = {
    "harmful-verdict rate": "CtdHarmfulVerdictRateHigh",
    "delegation budget burn": "CtdDelegationBudgetBurn",
    "no valid threshold": "CtdNoValidThreshold",
    "consumer lag": "CtdConsumerLagHigh",
    "time lag": "CtdConsumerTimeLagHigh",
    "DLQ rate": "CtdDeadLetterRateHigh",
    "no progress": "CtdNoProgress",
    "expert degraded": "CtdExpertDegraded",
}


def rules(renders: dict[str, list[Doc]]) -> list[dict[str, Any]]:
    rule = named(renders["gpu"], "PrometheusRule", "ctd-monitor")
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def test_required_alerts_exist(renders: dict[str, list[Doc]]) -> None:
    names = {r["alert"] for r in rules(renders)}
    missing = {what: alert for what, alert in REQUIRED_ALERTS.items() if alert not in names}
    assert not missing
    for r in rules(renders):
        assert r["labels"]["severity"] in {"info", "warning", "critical"}, r["alert"]
        assert r["annotations"]["summary"], r["alert"]


def test_exported_names_follow_the_exposition_format() -> None:
    worker = EXPORTED["ctd-worker"]
    assert "ctd_events_in_total" in worker and "ctd_events_in" not in worker  # counter
    assert {"ctd_batch_size_bucket", "ctd_batch_size_sum", "ctd_batch_size_count"} <= set(worker)  # histogram
    assert "le" in worker["ctd_batch_size_bucket"] and "le" not in worker["ctd_batch_size_sum"]
    assert worker["ctd_verdicts_out_total"] == {"decision", "source", "tenant"}
    assert "ctd_expert_degraded" in EXPORTED["ctd-guard"] and "ctd_expert_degraded" not in worker


def test_promql_parser_finds_selectors_and_skips_functions() -> None:
    expr = ('histogram_quantile(0.99, sum by (le) (rate(ctd_x_bucket{job="a",le!="+Inf"}[5m]))) > 1e-3 '
            'and on(pod) time() - ctd_y offset 5m')
    assert list(promql_selectors(expr)) == [("ctd_x_bucket", {"job": "a", "le": "+Inf"}), ("ctd_y", {})]


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_rule_metrics_and_labels_exist(renders: dict[str, list[Doc]], variant: str) -> None:
    rule = named(renders[variant], "PrometheusRule", "ctd-monitor")
    seen = 0
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            selectors = list(promql_selectors(str(r["expr"])))
            assert selectors, f"{r['alert']}: no metric in {r['expr']!r}"
            for metric, labels in selectors:
                seen += 1
                job = labels.get("job")
                # A selector scoped to one job must name that service's metric; unscoped ones either service's.
                registries = [EXPORTED[job]] if job else list(EXPORTED.values())
                assert job is None or job in EXPORTED, f"{r['alert']}: unknown job {job!r}"
                owners = [reg for reg in registries if metric in reg]
                assert owners, f"{r['alert']}: {metric} is not exported by {job or 'any service'}"
                for label in set(labels) - TARGET_LABELS:
                    assert any(label in reg[metric] for reg in owners), f"{r['alert']}: {metric} has no label {label}"
    assert seen >= len(REQUIRED_ALERTS)
