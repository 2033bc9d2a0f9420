"""Alerts on harmful final verdicts: the alert policy, the sinks (structured log, webhooks) and the alert handler.

docs/architecture.md ("Alerts") describes when a verdict becomes an alert and how sinks are delivered.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import time
import uuid
from collections.abc import Sequence
from typing import Protocol

import httpx
from aiokafka import TopicPartition

from probes.logs import get_logger
from worker.config import AlertsConfig, GuardSettings, WebhookSinkConfig
from worker.decode import InvalidVerdict, decode_verdict
from worker.events import MAX_EVENT_BYTES, Alert, Verdict, utcnow
from worker.metrics import AlerterMetrics, TenantLabels
from worker.signing import SignatureError, Signer
from worker.stream import Envelope, Message, OutputsSlot, Record, ServiceLimits, Stream
from worker.sweeper import DelegationSweeper

log = get_logger(__name__)
ALERT_NAMESPACE = uuid.UUID("6f1c2d4e-9a7b-4c1e-8f3a-2b5d7e9c0a11")
SINK_QUEUE = 1000
# Verdicts are cheap to judge and acknowledged in order of arrival: a deep window keeps the alerter off the
# critical path of a verdict burst without holding much memory (a verdict is well under a kilobyte).
ALERTER_MAX_IN_FLIGHT = 4096
SINK_FLUSH_S = 2.0
_RANK = {"warning": 0, "critical": 1}
OVERFLOW_BUCKET = "\x00overflow"  # no tenant name holds a NUL: the shared bucket of tenants past the table


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take`` says whether one was available."""

    def __init__(self, rate: float, burst: int, now: float | None = None) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens = float(burst)
        self.updated = time.monotonic() if now is None else now

    def available(self, now: float | None = None) -> bool:
        """Whether ``take`` would succeed now (takes nothing)."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return self.tokens >= 1.0

    def take(self, now: float | None = None) -> bool:
        if self.available(now):
            self.tokens -= 1.0
            return True
        return False


class AlertPolicy:
    """Which verdicts become alerts, and how severe: pure and clock-injectable, so it is unit-tested alone."""

    def __init__(self, config: AlertsConfig, *, max_conversations: int = 100_000) -> None:
        self.config = config
        self.max_conversations = max_conversations
        self._last_alert: collections.OrderedDict[str, tuple[float, str]] = collections.OrderedDict()

    @staticmethod
    def is_final(verdict: Verdict) -> bool:
        if verdict.source != "probe" and not verdict.delegated:
            return False  # the guard's label of an audited event: the probe's verdict on it stands (and alerted)
        # "expert_unavailable": the guard gave up on it and answered fail-closed; it is final and must alert.
        return verdict.source in ("expert", "expert_unavailable") or not verdict.delegated

    def severity(self, verdict: Verdict) -> str:
        critical = verdict.p_unsafe >= self.config.critical_score
        if verdict.source == "probe" and not self.config.probe_critical:
            critical = False
        if verdict.source == "expert_unavailable":
            critical = True  # escalated for review and never reviewed: a person has to look
        return "critical" if critical else "warning"

    def consider(self, verdict: Verdict, now: float) -> tuple[Alert | None, str | None]:
        """The alert to raise, or None and why not (None reason: the verdict is not harmful or not final)."""
        # An unreviewed escalation (expert_unavailable) alerts whatever its decision: a person has to look.
        if (verdict.decision != "unsafe" and verdict.source != "expert_unavailable") or not self.is_final(verdict):
            return None, None
        if verdict.source == "probe" and not self.config.on_probe_verdicts:
            return None, "probe_verdicts_off"
        key = f"{verdict.tenant}\x00{verdict.conversation_id}"
        severity = self.severity(verdict)
        last = self._last_alert.get(key)
        # Within the window a conversation alerts once per severity step: a later critical verdict (the expert's,
        # or an unreviewed escalation) gets through a probe's earlier warning, never the other way round.
        if last is not None and now - last[0] < self.config.dedupe_window_s and _RANK[severity] <= _RANK[last[1]]:
            return None, "duplicate_conversation"
        self._last_alert[key] = (now, severity)
        self._last_alert.move_to_end(key)
        while len(self._last_alert) > self.max_conversations:
            self._last_alert.popitem(last=False)
        alert = Alert(
            alert_id=str(uuid.uuid5(ALERT_NAMESPACE, f"{verdict.event_id}/{verdict.source}")),
            event_id=verdict.event_id, conversation_id=verdict.conversation_id, tenant=verdict.tenant,
            severity="critical" if severity == "critical" else "warning", source=verdict.source,
            p_unsafe=verdict.p_unsafe, bundle_version=verdict.bundle_version, expert_version=verdict.expert_version,
            verdict_decided_at=verdict.decided_at, raised_at=utcnow(),
            metadata=verdict.metadata if self.config.include_metadata else {},
        )
        return alert, None


class AlertSink(Protocol):
    name: str

    async def deliver(self, alert: Alert) -> None:
        """Deliver one alert or raise after giving up."""
        ...


class LogSink:
    """One structured log line per alert (the log pipeline forwards it)."""

    name = "log"

    async def deliver(self, alert: Alert) -> None:
        log.warning("alert", alert_id=alert.alert_id, event_id=alert.event_id, conversation_id=alert.conversation_id,
                    tenant=alert.tenant, severity=alert.severity, source=alert.source, p_unsafe=alert.p_unsafe)


class WebhookSink:
    """POST the alert as JSON; retry network errors, 429 and 5xx with exponential backoff."""

    def __init__(self, config: WebhookSinkConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        # Keyed by the whole URL (two webhooks on one host are two sinks, with their own queues); the label shows
        # the host and a digest, never the path, which often carries a token.
        digest = hashlib.sha256(config.url.encode()).hexdigest()[:8]
        self.name = f"webhook:{httpx.URL(config.url).host}#{digest}"
        self._client = httpx.AsyncClient(timeout=config.timeout_s, headers=config.headers, transport=transport)

    async def deliver(self, alert: Alert) -> None:
        body = alert.to_json()
        delay = self.config.backoff_s
        for attempt in range(self.config.retries + 1):
            try:
                response = await self._client.post(self.config.url, content=body,
                                                   headers={"content-type": "application/json"})
                if response.status_code < 300:
                    return
                if response.status_code != 429 and response.status_code < 500:
                    raise WebhookRejected(f"{self.name} answered {response.status_code}")
                reason = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                reason = type(exc).__name__
            if attempt < self.config.retries:
                log.info("alert.webhook_retry", sink=self.name, attempt=attempt + 1, reason=reason)
                await asyncio.sleep(delay)
                delay *= 2
        raise WebhookRejected(f"{self.name}: gave up after {self.config.retries + 1} attempts ({reason})")

    async def aclose(self) -> None:
        await self._client.aclose()


class WebhookRejected(Exception):
    """A webhook refused an alert or stayed unreachable through every retry."""


def build_sinks(config: AlertsConfig) -> list[AlertSink]:
    sinks: list[AlertSink] = [LogSink()] if config.log_sink else []
    sinks.extend(WebhookSink(w) for w in config.webhooks)
    return sinks


class AlertHandler(OutputsSlot):
    """Verdicts in, alerts out (then notifications through the sinks)."""

    name = "alerter"

    def __init__(self, settings: GuardSettings, metrics: AlerterMetrics, sinks: Sequence[AlertSink]) -> None:
        a = settings.alerts
        self.metrics = metrics
        self.settings = settings
        self.policy = AlertPolicy(a)
        # One bucket per tenant (alerts.rate_limit_scope): one tenant's alert flood cannot silence another's.
        self.buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()
        self.tenant_labels = TenantLabels(settings.metrics)
        # Alerts are signed with the guard's key (the alerter runs in the guard process); verdicts are read from
        # both roles, each only for the sources it writes (worker/decode.py).
        self.signer = Signer.from_config(settings.signing, "guard", verifies=("worker", "guard"), service="alerter",
                                         refusals=metrics.signature_refusals,
                                         insecure_gauge=metrics.signing_insecure)
        self.sinks = list(sinks)
        self._queues = {sink.name: asyncio.Queue[Alert](SINK_QUEUE) for sink in self.sinks}
        # Alerts each tenant holds in each sink's queue: one tenant fills at most its share of a shared queue.
        self._queued: dict[str, collections.Counter[str]] = {sink.name: collections.Counter() for sink in self.sinks}
        self._tenant_share = max(1, int(SINK_QUEUE * a.sink_tenant_share))
        # Every delegated event ends final: the sweeper sees every verdict the alerter reads (worker/sweeper.py).
        self.sweeper = DelegationSweeper(settings, metrics, self.signer) if settings.sweeper.enabled else None

    def assigned(self, partitions: set[TopicPartition]) -> None:
        if self.sweeper is not None:
            self.sweeper.assigned(partitions)

    def revoked(self, partitions: set[TopicPartition]) -> None:
        if self.sweeper is not None:
            self.sweeper.revoked(partitions)

    # ---------------------------------------------------------------- handler protocol
    def busy(self) -> bool:
        return False  # records are handled as they arrive; the stream drains their acknowledgements

    def waiting_on_purpose(self) -> bool:
        return False

    def wake(self) -> None:
        pass  # nothing is held back between accept and publish

    async def close(self) -> None:
        if self.sweeper is not None:
            await self.sweeper.stop()
        for sink in self.sinks:
            close = getattr(sink, "aclose", None)
            if close is not None:
                await close()

    async def accept(self, records: Sequence[Record]) -> None:
        now = time.monotonic()
        for record in records:
            try:
                # A verdict its writer's key did not sign (a forged "the expert said safe", an expert verdict
                # signed with a worker key, an old one replayed, or a fake one that would use up a conversation's
                # dedupe window) is never acted on.
                verdict = decode_verdict(record, self.signer)
            except SignatureError as exc:
                self.out.dead_letter(record, "bad_signature", str(exc), "decode")
                continue
            except InvalidVerdict as exc:
                self.out.dead_letter(record, "invalid_verdict", str(exc)[:500], "decode")
                continue
            item = Envelope.of(record, verdict, now)
            if self.sweeper is not None:
                self.sweeper.observe(item.tp, verdict)
            alert, why_not = self.policy.consider(verdict, now)
            if why_not is not None:
                self.metrics.alerts_suppressed.labels(reason=why_not).inc()
            if alert is None:
                self.out.done(item)
                continue
            body = alert.to_json()
            message = Message(self.settings.topics.alerts, body, record.key,
                              [("alert_id", alert.alert_id.encode()), *self.signer.headers("alert", record.key, body)])
            self.out.publish(item, [message], functools.partial(self._raised, alert))

    def _raised(self, alert: Alert) -> None:
        self.tenant_labels.counter(self.metrics.alerts_raised, alert.tenant, severity=alert.severity,
                                   source=alert.source).inc()
        if not self._bucket(alert.tenant).take():
            self.metrics.alerts_suppressed.labels(reason="rate_limited").inc()
            return
        for sink in self.sinks:
            queued = self._queued[sink.name]
            if queued[alert.tenant] >= self._tenant_share:
                self.metrics.alerts_suppressed.labels(reason="tenant_sink_share").inc()
                continue
            try:
                self._queues[sink.name].put_nowait(alert)
            except asyncio.QueueFull:
                self.metrics.alerts_suppressed.labels(reason="sink_queue_full").inc()
                continue
            queued[alert.tenant] += 1

    def _bucket(self, tenant: str, now: float | None = None) -> TokenBucket:
        """The tenant's bucket. At most ``alerts.max_tenant_buckets`` are kept; only a bucket that has refilled to
        its burst is evicted (a new one would be the same), so rotating names never buys a fresh burst: while
        every kept bucket is still refilling, new tenants share one overflow bucket."""
        a = self.settings.alerts
        now = time.monotonic() if now is None else now
        key = tenant if a.rate_limit_scope == "tenant" else ""
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= a.max_tenant_buckets and not self._evict_refilled(now):
                key = OVERFLOW_BUCKET
                bucket = self.buckets.get(key)
            if bucket is None:
                bucket = self.buckets[key] = TokenBucket(a.rate_limit_per_s, a.rate_burst, now)
            self.metrics.alert_buckets.set(len(self.buckets))
        self.buckets.move_to_end(key)
        return bucket

    def _evict_refilled(self, now: float) -> bool:
        oldest_key = next((k for k in self.buckets if k != OVERFLOW_BUCKET), None)
        if oldest_key is None:
            return False
        oldest = self.buckets[oldest_key]
        if oldest.tokens + (now - oldest.updated) * oldest.rate < oldest.burst:
            return False
        del self.buckets[oldest_key]
        return True

    # ---------------------------------------------------------------- notifications
    async def run(self) -> None:
        """The work loop is the sinks' delivery: one sender per sink, flushed briefly when the stream stops."""
        senders = [asyncio.create_task(self._send_loop(sink, self._queues[sink.name]), name=f"sink-{sink.name}")
                   for sink in self.sinks]
        if self.sweeper is not None:
            senders.append(asyncio.create_task(self.sweeper.run(), name="sweeper"))
        if not senders:
            return
        try:
            await asyncio.wait(senders)  # not gather: a cancelled gather would cancel the senders before the flush
        finally:
            # Give queued notifications a moment; the alerts topic already holds every alert durably.
            try:
                await asyncio.wait_for(asyncio.gather(*(q.join() for q in self._queues.values())),
                                       timeout=SINK_FLUSH_S)
            except TimeoutError:
                log.warning("alert.sinks_unflushed", left=sum(q.qsize() for q in self._queues.values()))
            for task in senders:
                task.cancel()
            await asyncio.gather(*senders, return_exceptions=True)

    async def _send_loop(self, sink: AlertSink, queue: asyncio.Queue[Alert]) -> None:
        while True:
            alert = await queue.get()
            queued = self._queued[sink.name]
            queued[alert.tenant] -= 1
            if queued[alert.tenant] <= 0:
                del queued[alert.tenant]
            try:
                await sink.deliver(alert)
            except Exception as exc:  # noqa: BLE001 - a sink failure is counted, never fatal
                self.metrics.alert_sink_errors.labels(sink=sink.name).inc()
                log.error("alert.sink_failed", sink=sink.name, alert_id=alert.alert_id, error=str(exc))
            finally:
                queue.task_done()


AlertStream = Stream[AlertHandler]


def alert_stream(settings: GuardSettings, metrics: AlerterMetrics | None = None, *,
                 sinks: Sequence[AlertSink] | None = None, serve_http: bool = False) -> AlertStream:
    """The alerter: the verdicts topic through ``AlertHandler`` in the alerter's consumer group."""
    metrics = metrics or AlerterMetrics()
    handler = AlertHandler(settings, metrics, build_sinks(settings.alerts) if sinks is None else sinks)
    return Stream(handler, kafka=settings.kafka, group_id=settings.alerts.group_id, topic=settings.topics.verdicts,
                  dead_letter_topic=settings.topics.dead_letter, metrics=metrics,
                  limits=ServiceLimits.from_config(settings.guard, max_event_bytes=MAX_EVENT_BYTES,
                                                   serve_http=serve_http, max_in_flight=ALERTER_MAX_IN_FLIGHT))
