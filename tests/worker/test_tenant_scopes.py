"""Bounded per-tenant tables with eviction (issue 22 item 5): budget windows, alert buckets, sink queue shares,
and the tenant label of the metrics (issue 24).

Tenant names must not pin a table for good (the first names seen), grow it (rotating names), buy a fresh alert
burst per name, fill a sink queue that other tenants' alerts share, or grow the metrics' exposition.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import numpy as np

from probes.runtime.monitor import DelegationRule
from worker.alerts import OVERFLOW_BUCKET, AlertHandler
from worker.budget import OVERFLOW_SCOPE, BudgetController
from worker.config import AlertsConfig, BudgetConfig, GuardSettings, MetricsConfig
from worker.events import Alert
from worker.metrics import OTHER_TENANTS, AlerterMetrics, TenantLabels, WorkerMetrics
from worker.tenancy import TenantSlots

RULE = DelegationRule("dv", 1.5, 0.1)


def _controller(**overrides: Any) -> BudgetController:
    return BudgetController(RULE, BudgetConfig(**{"window": 200, "min_window": 50, "recertify_every": 50,
                                                  "scope": "tenant", **overrides}))


def _decide(controller: BudgetController, tenants: list[str], seed: int = 0) -> None:
    signals = np.random.default_rng(seed).normal(0, 1, len(tenants))
    controller.decide(signals, [0] * len(tenants), tenants)


def test_the_first_tenants_seen_do_not_pin_the_budget_windows() -> None:
    controller = _controller(max_scopes=3, scope_idle_events=100)
    _decide(controller, ["a", "b", "c"] * 10)
    _decide(controller, ["d"] * 5)
    assert "t:d" not in controller.windows, "while a, b and c are in use, a new tenant shares the overflow window"
    assert OVERFLOW_SCOPE in controller.windows
    _decide(controller, ["c"] * 100)  # a and b fall idle
    _decide(controller, ["d", "e"])
    assert {"t:c", "t:d", "t:e"} <= set(controller.windows) and "t:a" not in controller.windows
    assert controller.evictions == 2


def test_rotating_tenant_names_cannot_grow_the_budget_windows_or_evict_an_active_tenant() -> None:
    controller = _controller(max_scopes=50, scope_idle_events=1_000)
    victim = controller.window(0, "victim")
    for i in range(5_000):
        tenants = [f"rot-{i}"] + (["victim"] if i % 100 == 0 else [])
        _decide(controller, tenants, seed=i)
        assert len(controller.windows) <= 51
    assert controller.windows["t:victim"] is victim, "the victim's window (and its state) was never evicted"
    assert victim.seen == 50


def _alert(tenant: str, i: int) -> Alert:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return Alert(alert_id=f"{tenant}-{i}", event_id=f"{tenant}-{i}", conversation_id=f"c-{tenant}-{i}", tenant=tenant,
                 severity="critical", source="expert", p_unsafe=0.99, bundle_version="b", verdict_decided_at=now,
                 raised_at=now)


class _Stuck:
    """A sink that never finishes a delivery (a webhook timing out): its queue only fills."""

    name = "stuck"

    async def deliver(self, alert: Alert) -> None:
        await asyncio.Event().wait()


def _handler(sinks: list[Any] | None = None, **alerts: Any) -> AlertHandler:
    return AlertHandler(GuardSettings(alerts=AlertsConfig(**alerts)), AlerterMetrics(), sinks or [])


def test_rotating_names_buy_no_fresh_alert_bursts_and_leave_the_victims_bucket_alone() -> None:
    handler = _handler(rate_limit_per_s=0.001, rate_burst=5, max_tenant_buckets=100)
    assert handler._bucket("victim", now=0.0).take(0.0)
    allowed = sum(handler._bucket(f"rot-{i}", now=1.0).take(1.0) for i in range(5_000))
    assert allowed <= 99 + 5, f"{allowed} alerts through from 5,000 rotating names"
    assert len(handler.buckets) <= 101
    victim = handler._bucket("victim", now=2.0)
    assert sum(victim.take(2.0) for _ in range(10)) == 4, "the victim keeps its own, undrained bucket"


def test_only_refilled_buckets_are_evicted() -> None:
    handler = _handler(rate_limit_per_s=1.0, rate_burst=5, max_tenant_buckets=3)
    for name in ("a", "b", "c"):
        handler._bucket(name, now=0.0).take(0.0)
    handler._bucket("d", now=0.5).take(0.5)
    assert "d" not in handler.buckets and OVERFLOW_BUCKET in handler.buckets
    handler._bucket("e", now=10.0)  # a has long refilled: a fresh bucket is the same, it may go
    assert "e" in handler.buckets and "a" not in handler.buckets


async def test_one_tenant_cannot_fill_a_shared_sink_queue() -> None:
    handler = _handler([_Stuck()], rate_limit_per_s=1000.0, rate_burst=10_000, sink_tenant_share=0.1)
    for i in range(1_500):
        handler._raised(_alert("noisy", i))
    for i in range(3):
        handler._raised(_alert("quiet", i))
    queue = handler._queues["stuck"]
    queued = [queue.get_nowait() for _ in range(queue.qsize())]
    assert sum(a.tenant == "noisy" for a in queued) == 100
    assert sum(a.tenant == "quiet" for a in queued) == 3, "the quiet tenant's alerts still reach the sink"


def _tenant_values(metrics: WorkerMetrics | AlerterMetrics, name: str) -> set[str]:
    """The tenant label values of a metric's exposed samples."""
    return {s.labels["tenant"] for m in metrics.registry.collect() if m.name == name for s in m.samples}


def test_tenant_slots_pin_named_tenants_and_evict_only_idle_ones() -> None:
    evicted: list[tuple[str, int]] = []
    slots = TenantSlots(2, idle_after=10, pinned=["vip"], on_evict=lambda t, idle: evicted.append((t, idle)))
    assert slots.use("a") and slots.use("b") and slots.use("vip")
    assert not slots.use("c"), "both places in use: c shares the overflow"
    assert "c" not in slots and "vip" in slots and len(slots) == 2
    for _ in range(10):
        slots.use("b")
    assert slots.use("c") and evicted == [("a", 13)] and "a" not in slots and "b" in slots
    for _ in range(100):
        assert slots.use("vip")  # pinned: never counted, never evicted
    assert "vip" in slots and len(slots) == 2


def test_rotating_tenant_names_keep_the_tenant_label_bounded() -> None:
    metrics = WorkerMetrics()
    labels = TenantLabels(MetricsConfig(tenant_labels=("acme",), max_tenant_labels=5, tenant_label_idle_events=50))
    victim = 0  # the victim's verdicts counted under its own label value
    for i in range(5_000):
        tenant = "acme" if i % 7 == 0 else "victim" if i % 10 == 0 else f"rot-{i}"
        labels.counter(metrics.verdicts_out, tenant, decision="safe", source="probe").inc()
        victim += tenant == "victim" and labels.peek("victim") == "victim"
        values = _tenant_values(metrics, "ctd_verdicts_out")
        assert len(values) <= 1 + 5 + 1, values  # named + max_tenant_labels + other
    assert {"acme", "victim", OTHER_TENANTS} <= values, "named and active tenants keep their own value"
    get = metrics.registry.get_sample_value
    assert get("ctd_verdicts_out_total", {"decision": "safe", "source": "probe", "tenant": "acme"}) == 715
    # Once it had a place the active victim kept it: rotating names never evicted it (and reset its series).
    assert get("ctd_verdicts_out_total", {"decision": "safe", "source": "probe", "tenant": "victim"}) == victim > 300
    assert labels.slots.evictions > 0, "idle rotated names gave their place up (and their series were removed)"


def test_a_tenant_named_other_is_counted_with_the_others() -> None:
    labels = TenantLabels(MetricsConfig(max_tenant_labels=3))
    assert labels.use(OTHER_TENANTS) == OTHER_TENANTS and len(labels.slots) == 0
    assert labels.peek("never-seen") == OTHER_TENANTS and labels.use("a") == "a" == labels.peek("a")


def test_rotating_names_keep_the_alert_tenant_label_bounded() -> None:
    settings = GuardSettings(alerts=AlertsConfig(rate_limit_per_s=1000.0, rate_burst=10_000),
                             metrics=MetricsConfig(max_tenant_labels=10, tenant_label_idle_events=100))
    handler = AlertHandler(settings, AlerterMetrics(), [])
    for i in range(2_000):
        handler._raised(_alert("victim" if i % 20 == 0 else f"rot-{i}", i))
    values = _tenant_values(handler.metrics, "ctd_alerts_raised")
    assert len(values) <= 10 + 1 and {"victim", OTHER_TENANTS} <= values
    total = sum(s.value for m in handler.metrics.registry.collect() if m.name == "ctd_alerts_raised"
                for s in m.samples if s.name == "ctd_alerts_raised_total")
    assert 0 < total < 2_000, "an evicted tenant's series are removed (never counted twice)"


def test_tenant_scope_gauges_follow_the_tenant_labels() -> None:
    metrics = WorkerMetrics()
    labels = TenantLabels(MetricsConfig(max_tenant_labels=1))
    controller = BudgetController(RULE, BudgetConfig(window=200, min_window=50, recertify_every=50, scope="tenant",
                                                     max_scopes=2, scope_idle_events=100), metrics,
                                  tenant_label=labels.peek)
    labels.use("a")  # a has a label of its own; b and c (over max_scopes: the overflow window) do not
    _decide(controller, ["a", "b", "c"] * 60)
    scopes = {s.labels["scope"] for m in metrics.registry.collect() if m.name == "ctd_window_delegation_rate"
              for s in m.samples}
    assert scopes == {"a", OTHER_TENANTS}
    rates = [w.rate for k, w in controller.windows.items() if k != "t:a"]
    assert metrics.window_delegation_rate.labels(scope=OTHER_TENANTS)._value.get() == max(r for r in rates if r)
    _decide(controller, ["b"] * 150 + ["d"])  # a falls idle and d takes its window: a's gauges go with it
    assert "t:a" not in controller.windows and "t:d" in controller.windows
    assert metrics.registry.get_sample_value("ctd_window_delegation_rate", {"scope": "a"}) is None
