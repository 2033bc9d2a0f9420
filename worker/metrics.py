"""Prometheus metrics of the worker and the guard service (names are referenced by deploy/ alert rules).

Every label is bounded: ``partition``/``topic`` by the subscribed topics, ``scope`` by the budget's windows, and
``tenant`` by TenantLabels (metrics.* settings), since tenant names can be many or chosen by a producer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from worker.config import MetricsConfig
from worker.tenancy import TenantSlots

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OTHER_TENANTS = "other"  # the tenant label of every tenant without one of its own


@dataclass(frozen=True, slots=True)
class _Child:
    """A labelled counter's child, kept with its label values so that it can be removed."""

    metric: Counter
    values: tuple[str, ...]
    child: Counter


class TenantLabels:
    """The ``tenant`` label value of each tenant, bounded (metrics.* settings): tenants named in
    ``metrics.tenant_labels`` (and ``pinned``) always have their own; up to ``metrics.max_tenant_labels`` others hold
    one while active (TenantSlots: the least recently used gives its place to a new tenant once idle for
    ``metrics.tenant_label_idle_events`` lookups); the rest are ``other``. So rotating tenant names cannot grow the
    exposition: an evicted tenant's series are removed, and at most ``len(named) + max + 1`` tenant values exist.
    One per registry, used from the event loop only.
    """

    def __init__(self, config: MetricsConfig, pinned: Iterable[str] = ()) -> None:
        self.slots = TenantSlots(config.max_tenant_labels, config.tenant_label_idle_events,
                                 pinned=(*config.tenant_labels, *pinned), on_evict=self._evicted)
        # Children made per tenant value, so an evicted tenant's series go with it.
        self._children: dict[str, dict[tuple[int, tuple[str, ...]], _Child]] = {}

    def use(self, tenant: str) -> str:
        """The label value for one more record of ``tenant`` (a lookup: it may take an idle tenant's place)."""
        if tenant == OTHER_TENANTS:  # a tenant named "other" is counted with the others, never apart
            return OTHER_TENANTS
        return tenant if self.slots.use(tenant) else OTHER_TENANTS

    def peek(self, tenant: str) -> str:
        """The label value ``tenant`` has now, without a lookup (for gauges refreshed over every tenant's state)."""
        return tenant if tenant != OTHER_TENANTS and tenant in self.slots else OTHER_TENANTS

    def counter(self, metric: Counter, tenant: str, **labels: str) -> Counter:
        """``metric``'s child (it has a ``tenant`` label) for one more record of ``tenant`` with ``labels``."""
        labels["tenant"] = self.use(tenant)
        values = tuple(labels[name] for name in metric._labelnames)  # the order remove() takes them in
        children = self._children.setdefault(labels["tenant"], {})
        key = (id(metric), values)
        held = children.get(key)
        if held is None:
            held = children[key] = _Child(metric, values, metric.labels(*values))
        return held.child

    def _evicted(self, tenant: str, idle: int) -> None:
        for held in self._children.pop(tenant, {}).values():
            held.metric.remove(*held.values)


class StageClock:
    """CPU time per pipeline stage, timed around a whole batch (never per event, never across an await).

    ``time.thread_time`` rather than a wall clock: the prep and inference threads contend for the GIL with the
    event loop, and waiting for it is not the stage's cost. What no stage covers (the Kafka client's fetch
    parsing and produce batching, ack futures, the event loop itself) is the process's CPU time minus the sum.
    """

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._children: dict[str, Counter] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.thread_time()
        try:
            yield
        finally:
            child = self._children.get(stage)
            if child is None:
                child = self._children[stage] = self._counter.labels(stage=stage)
            child.inc(time.thread_time() - started)


@dataclass
class ConsumerMetrics:
    """Consumer health shared by every stream service: what was consumed, lag, progress, commits, DLQ.

    ``prefix`` keeps two services apart when they share one process and registry (the alerter runs inside
    the guard service as ``ctd_alerter_*``).
    """

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    prefix: str = "ctd"
    consumed_name: str = "events_in"
    consumed_help: str = "Records consumed from the input topic"

    def __post_init__(self) -> None:
        r, p = self.registry, self.prefix
        # Per topic and partition, as the lag gauge: bounded by the subscribed topics' partitions.
        self.consumed = Counter(f"{p}_{self.consumed_name}", self.consumed_help, ["topic", "partition"], registry=r)
        # stage: worker/stream.py Stage (four values); reason: the code's own constants.
        self.dead_letters = Counter(f"{p}_dead_letters", "Records sent to the dead-letter topic", ["stage", "reason"],
                                    registry=r)
        self.consumer_lag = Gauge(
            f"{p}_consumer_lag", "High watermark minus committed offset", ["topic", "partition"], registry=r
        )
        self.rebalances = Counter(f"{p}_rebalances", "Partition assignments and revocations", ["kind"], registry=r)
        self.in_flight = Gauge(f"{p}_in_flight", "Records consumed but not yet committable", registry=r)
        self.paused = Gauge(f"{p}_fetch_paused", "1 while fetching is paused by backpressure", registry=r)
        self.last_progress = Gauge(
            f"{p}_last_progress_timestamp_seconds", "Unix time of the last poll that returned or commit", registry=r
        )
        self.publish_retries = Counter(
            f"{p}_publish_retries", "Output sends retried after a transient broker failure", registry=r
        )
        self.publish_errors = Counter(
            f"{p}_publish_errors", "Outputs the broker did not acknowledge (offset left uncommitted)", registry=r
        )
        self.ready = Gauge(f"{p}_ready", "1 when models are loaded and partitions are assigned", registry=r)
        self.signature_refusals = Counter(
            f"{p}_signature_refusals", "Records refused for their signature (worker/signing.py)",
            ["kind", "role", "reason"], registry=r)
        self.signing_insecure = Gauge(
            f"{p}_signing_insecure", "1 while signing.insecure_dev lets this service run without its keys", registry=r)
        self.stage_cpu = StageClock(Counter(
            f"{p}_stage_cpu_seconds", "CPU seconds of the host-side stages (the thread running each)", ["stage"],
            registry=r,
        ))


@dataclass
class WorkerMetrics(ConsumerMetrics):
    """One registry per worker instance, so several workers can live in one test process."""

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.registry
        self.events_in = self.consumed
        self.verdicts_out = Counter(
            "ctd_verdicts_out", "Verdicts acknowledged by the broker (tenant: bounded, TenantLabels)",
            ["decision", "source", "tenant"], registry=r)
        self.delegated = Counter("ctd_delegated", "Events sent to the expert-review topic", registry=r)
        self.tenant_unverified = Counter(
            "ctd_tenant_unverified", "Events scored under tenant.unverified (gateway header missing or wrong)",
            ["reason"], registry=r)
        self.tenant_claims_overridden = Counter(
            "ctd_tenant_claims_overridden", "Events whose payload tenant differs from the resolved tenant", registry=r)
        self.tenant_scopes = Gauge(
            "ctd_tenant_scopes", "Per-tenant entries held by a table (budget windows, fair queue, tenant metric labels)", ["table"],
            registry=r)
        self.canonical_rescores = Counter(
            "ctd_canonical_rescores", "Events within worker.decision_logit_margin of the cut, scored again from rows forwarded on their own", registry=r)
        self.canonical_rows = Counter(
            "ctd_canonical_rows", "Rows of those events forwarded again, each on its own", registry=r)
        self.batch_size = Histogram(
            "ctd_batch_size", "Events per inference batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.batch_tokens = Histogram(
            "ctd_batch_tokens", "Padded tokens per inference batch",
            buckets=(128, 512, 1024, 2048, 4096, 8192, 16384, 32768), registry=r,
        )
        self.queue_latency = Histogram(
            "ctd_queue_latency_seconds", "Time from consume to the start of inference", buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_latency = Histogram(
            "ctd_inference_latency_seconds", "Forward pass + heads per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.end_to_end_latency = Histogram(
            "ctd_end_to_end_latency_seconds", "Consume to broker-acknowledged verdict", buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.delegation_rate = Gauge(
            "ctd_delegation_rate", "Fraction of recent verdicts delegated (last 1000 events)", registry=r
        )
        self.threshold = Gauge(
            "ctd_delegation_threshold", "Threshold applied to the delegation signal (the highest over the scopes)",
            registry=r)
        self.budget_alpha = Gauge("ctd_delegation_budget", "Delegation budget alpha of the bundle", registry=r)
        self.no_valid_threshold = Gauge(
            "ctd_no_valid_threshold", "1 when no certified threshold exists (never delegating)", registry=r
        )
        self.inference_errors = Counter(
            "ctd_inference_errors", "Inference failures (batches split and retried)", registry=r
        )
        self.circuit_open = Gauge(
            "ctd_inference_circuit_open", "1 while the breaker is open (the model failing every event)", registry=r
        )
        self.bounded_views = Counter(
            "ctd_bounded_views", "Events past the message or content limits, scored on their bounded view", registry=r
        )
        # Live budget control (worker/budget.py).
        # Per budget scope (worker/budget.py, scope_label): "worker", a partition, or a bounded tenant label.
        self.window_threshold = Gauge(
            "ctd_window_threshold", "Label-free threshold certified on the scope's window (NaN until it applies)",
            ["scope"], registry=r,
        )
        self.window_delegation_rate = Gauge(
            "ctd_window_delegation_rate", "Realised delegation rate over the scope's budget window", ["scope"],
            registry=r,
        )
        self.budget_exceeded = Gauge(
            "ctd_budget_exceeded", "1 while the scope's delegation rate is significantly above the budget",
            ["scope"], registry=r,
        )
        self.cap_hits = Counter(
            "ctd_budget_cap_hits", "Delegations the hard cap (token bucket at alpha) refused", registry=r
        )
        self.recertifications = Counter(
            "ctd_window_recertifications", "Window threshold re-certifications", ["outcome"], registry=r
        )
        # Online recalibration from audits (worker/recalibration.py).
        self.audits_sent = Counter(
            "ctd_audits_sent", "Audit-sample events sent to the expert-review topic (acknowledged)", registry=r
        )
        self.audits_refused = Counter(
            "ctd_audits_refused", "Events the keyed audit sample chose but a quota did not send (tenant_rate: the "
            "tenant's audit rate; budget: the audit budget)", ["reason"], registry=r,
        )
        self.audit_tenant_displaced = Counter(
            "ctd_audit_tenant_displaced", "Audits that replaced their tenant's oldest in the window (tenant_share)",
            registry=r,
        )
        self.audit_verdicts_in = Counter(
            "ctd_audit_verdicts_in", "Expert audit verdicts fed to the recalibration window", registry=r
        )
        self.audit_verdicts_skipped = Counter(
            "ctd_audit_verdicts_skipped", "Audit verdicts not fed (malformed, bad signature, duplicate, no expert, no features)",
            ["reason"], registry=r,
        )
        self.recalibration_version = Gauge(
            "ctd_recalibration_version", "Version of the recalibration state in force (0: none refitted yet)",
            registry=r,
        )
        self.recalibration_window_cut = Gauge(
            "ctd_recalibration_window_cut", "1 while the cut re-certified on the audit window decides, 0 offline",
            registry=r,
        )
        self.recalibration_cut = Gauge(
            "ctd_recalibration_cut", "Unsafe cut in force, on the score scale", ["scale"], registry=r
        )
        self.recalibration_window = Gauge(
            "ctd_recalibration_window", "Audited verdicts in the recalibration window", registry=r
        )
        self.recalibration_benign_flag_rate = Gauge(
            "ctd_recalibration_window_benign_flag_rate",
            "Realised flag rate of the cut in force on the window's expert-benign audits (NaN: none)", registry=r,
        )
        self.recalibration_refits = Counter(
            "ctd_recalibration_refits", "Refits of the map and cut", ["source"], registry=r
        )


@dataclass
class GuardMetrics(ConsumerMetrics):
    """The guard service: review requests in, expert verdicts out."""

    consumed_name: str = "expert_requests_in"
    consumed_help: str = "Review requests consumed"

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.registry
        self.requests_in = self.consumed
        self.verdicts_out = Counter(
            "ctd_expert_verdicts_out", "Expert verdicts acknowledged by the broker", ["decision"], registry=r
        )
        self.expert_errors = Counter(
            "ctd_expert_errors", "Expert scoring failures (batch retried later)", ["kind"], registry=r
        )
        self.audit_verdicts_out = Counter(
            "ctd_expert_audit_verdicts_out", "Expert verdicts on audited events acknowledged by the broker", registry=r
        )
        self.canonical_rescores = Counter(
            "ctd_expert_canonical_rescores", "Requests within guard.decision_logit_margin of their cut, scored again "
            "in a batch of their own", registry=r)
        self.degraded = Gauge("ctd_expert_degraded", "1 while the expert is unavailable or timing out", registry=r)
        self.degraded_total = Counter(
            "ctd_expert_degraded_episodes", "Times the expert became unavailable", registry=r
        )
        self.circuit_open = Gauge(
            "ctd_expert_circuit_open", "1 while the breaker is open (expert failing every request)", registry=r
        )
        self.abandoned_calls = Gauge(
            "ctd_expert_abandoned_calls", "Expert calls still running after their timeout (left behind)", registry=r
        )
        self.expert_latency = Histogram(
            "ctd_expert_latency_seconds", "Expert scoring time per batch, re-scores near the cut included",
            buckets=LATENCY_BUCKETS, registry=r
        )
        self.review_latency = Histogram(
            "ctd_expert_review_latency_seconds", "Review requested to expert verdict acknowledged",
            buckets=LATENCY_BUCKETS, registry=r,
        )


@dataclass
class AlerterMetrics(ConsumerMetrics):
    """The alerter: final harmful verdicts in, alerts out (topic + sinks)."""

    prefix: str = "ctd_alerter"
    consumed_name: str = "verdicts_in"
    consumed_help: str = "Verdicts consumed by the alerter"

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.registry
        self.alerts_raised = Counter("ctd_alerts_raised", "Alerts published (tenant: bounded, TenantLabels)",
                                     ["severity", "source", "tenant"], registry=r)
        self.alerts_suppressed = Counter(
            "ctd_alerts_suppressed", "Harmful verdicts not alerted or not notified", ["reason"], registry=r
        )
        self.alert_sink_errors = Counter(
            "ctd_alert_sink_errors", "Alert deliveries a sink gave up on after retries", ["sink"], registry=r
        )
        self.sweeper_pending = Gauge(
            "ctd_sweeper_pending", "Delegated events waiting for their final verdict (worker/sweeper.py)", registry=r
        )
        self.sweeper_swept = Counter(
            "ctd_sweeper_swept", "Delegated events the sweeper finalised as expert_unavailable", ["reason"], registry=r
        )
        self.alert_buckets = Gauge("ctd_alert_tenant_buckets", "Per-tenant alert rate buckets held", registry=r)
