"""Alert policy, rate limiting and webhook delivery, without a broker (the broker tests are in test_guard_kafka)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import pytest

from worker.alerts import AlertPolicy, TokenBucket, WebhookRejected, WebhookSink
from worker.config import AlertsConfig, WebhookSinkConfig
from worker.events import BudgetState, Timings, Verdict


def verdict(*, conversation: str = "c1", event: str = "e1", p: float = 0.95, source: str = "expert",
            delegated: bool = True, tenant: str = "t", **extra: Any) -> Verdict:
    return Verdict(
        event_id=event, conversation_id=conversation, tenant=tenant, p_unsafe=p, dv=None, delegated=delegated,
        decision="unsafe" if p >= 0.5 else "safe", source=source, budget=BudgetState(), bundle_version="b",
        model_version="m", expert_version="x" if source == "expert" else None, timings=Timings(),
        decided_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), metadata={"label": 1, "note": "secret"}, **extra,
    )


def test_only_harmful_final_verdicts_alert() -> None:
    policy = AlertPolicy(AlertsConfig())
    assert policy.consider(verdict(p=0.2), 0.0) == (None, None)  # safe
    # a delegated probe verdict is not final: the expert's answer decides
    assert policy.consider(verdict(source="probe", delegated=True, conversation="c2"), 0.0) == (None, None)
    alert, why = policy.consider(verdict(source="probe", delegated=False, conversation="c3"), 0.0)
    assert alert is not None and why is None and alert.source == "probe"
    off = AlertPolicy(AlertsConfig(on_probe_verdicts=False))
    assert off.consider(verdict(source="probe", delegated=False), 0.0) == (None, "probe_verdicts_off")
    assert off.consider(verdict(), 0.0)[0] is not None


def test_one_alert_per_conversation_within_the_window() -> None:
    policy = AlertPolicy(AlertsConfig(dedupe_window_s=60))
    first, _ = policy.consider(verdict(event="e1"), 0.0)
    assert first is not None
    assert policy.consider(verdict(event="e2"), 30.0) == (None, "duplicate_conversation")
    assert policy.consider(verdict(event="e3", conversation="other"), 30.0)[0] is not None
    # the same conversation id under another tenant is another conversation
    assert policy.consider(verdict(event="e4", tenant="t2"), 30.0)[0] is not None
    again, _ = policy.consider(verdict(event="e5"), 61.0)
    assert again is not None and again.alert_id != first.alert_id
    # alert ids are stable per event, so a redelivered verdict yields the same id downstream can dedupe on
    assert AlertPolicy(AlertsConfig()).consider(verdict(event="e1"), 0.0)[0].alert_id == first.alert_id  # type: ignore[union-attr]


def test_dedupe_memory_is_bounded() -> None:
    policy = AlertPolicy(AlertsConfig(), max_conversations=10)
    for i in range(50):
        policy.consider(verdict(conversation=f"c{i}", event=f"e{i}"), 0.0)
    assert len(policy._last_alert) == 10
    # the oldest were forgotten, the newest are still deduplicated
    assert policy.consider(verdict(conversation="c49", event="x"), 1.0) == (None, "duplicate_conversation")
    assert policy.consider(verdict(conversation="c0", event="y"), 1.0)[0] is not None


def test_severity_from_score_and_source_and_no_metadata_by_default() -> None:
    policy = AlertPolicy(AlertsConfig(critical_score=0.9))
    high, _ = policy.consider(verdict(p=0.95, conversation="a"), 0.0)
    low, _ = policy.consider(verdict(p=0.6, conversation="b"), 0.0)
    probe, _ = policy.consider(verdict(p=0.99, source="probe", delegated=False, conversation="c"), 0.0)
    assert high is not None and high.severity == "critical" and high.metadata == {}
    assert low is not None and low.severity == "warning"
    assert probe is not None and probe.severity == "warning"
    trusting = AlertPolicy(AlertsConfig(probe_critical=True, include_metadata=True))
    probe2, _ = trusting.consider(verdict(p=0.99, source="probe", delegated=False), 0.0)
    assert probe2 is not None and probe2.severity == "critical" and probe2.metadata["label"] == 1


def test_token_bucket_allows_burst_then_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.4) is False  # 0.8 tokens
    assert bucket.take(0.5) is True
    assert bucket.take(100.0) and bucket.take(100.0) and bucket.take(100.0) and not bucket.take(100.0)


async def test_webhook_retries_server_errors_then_delivers() -> None:
    calls: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.content)
        return httpx.Response(503 if len(calls) < 3 else 200)

    sink = WebhookSink(WebhookSinkConfig(url="http://hooks.test/alert", retries=3, backoff_s=0.01),
                       transport=httpx.MockTransport(handler))
    alert, _ = AlertPolicy(AlertsConfig()).consider(verdict(), 0.0)
    assert alert is not None
    await sink.deliver(alert)
    await sink.aclose()
    assert len(calls) == 3 and b'"alert_id"' in calls[-1] and b"secret" not in calls[-1]


async def test_webhook_gives_up_on_client_errors_and_after_retries() -> None:
    alert, _ = AlertPolicy(AlertsConfig()).consider(verdict(), 0.0)
    assert alert is not None
    rejected = WebhookSink(WebhookSinkConfig(url="http://hooks.test/a", retries=5, backoff_s=0.01),
                           transport=httpx.MockTransport(lambda r: httpx.Response(400)))
    with pytest.raises(WebhookRejected, match="400"):
        await rejected.deliver(alert)
    attempts: list[int] = []

    def down(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        raise httpx.ConnectError("refused", request=request)

    unreachable = WebhookSink(WebhookSinkConfig(url="http://hooks.test/a", retries=2, backoff_s=0.01),
                              transport=httpx.MockTransport(down))
    with pytest.raises(WebhookRejected, match="gave up after 3 attempts"):
        await unreachable.deliver(alert)
    assert len(attempts) == 3


# --- issue 14: fail-closed verdicts alert, tenants have their own buckets, sinks per URL, signatures ------------


def test_a_fail_closed_verdict_is_final_and_critical() -> None:
    policy = AlertPolicy(AlertsConfig())
    fail_closed = verdict(source="expert_unavailable", p=0.3).model_copy(update={"decision": "unsafe"})
    alert, why = policy.consider(fail_closed, 0.0)
    assert why is None and alert is not None and alert.severity == "critical" and alert.source == "expert_unavailable"


def test_webhooks_on_one_host_are_separate_sinks() -> None:
    a = WebhookSink(WebhookSinkConfig(url="https://hooks.example.com/services/T1/secret-a"))
    b = WebhookSink(WebhookSinkConfig(url="https://hooks.example.com/services/T2/secret-b"))
    assert a.name != b.name and "secret" not in a.name and a.name.startswith("webhook:hooks.example.com#")


def _handler(**alerts: Any) -> Any:
    from worker.alerts import AlertHandler
    from worker.config import GuardSettings
    from worker.metrics import AlerterMetrics

    return AlertHandler(GuardSettings(alerts=AlertsConfig(**alerts)), AlerterMetrics(), [])


def test_one_tenants_alert_flood_does_not_silence_another() -> None:
    handler = _handler(rate_limit_per_s=0.001, rate_burst=5)
    flood = [handler._bucket("noisy").take() for _ in range(100)]
    assert sum(flood) == 5
    assert handler._bucket("quiet").take(), "the quiet tenant still has its own bucket"
    shared = _handler(rate_limit_per_s=0.001, rate_burst=5, rate_limit_scope="global")
    [shared._bucket("noisy").take() for _ in range(100)]
    assert not shared._bucket("quiet").take()


async def test_forged_verdicts_are_dead_lettered_not_alerted() -> None:
    import dataclasses

    from aiokafka import TopicPartition

    from tests.worker.helpers import role_signer
    from tests.worker.test_stream import record

    handler = _handler()  # the secure default: the session's real keys (tests/worker/conftest.py)
    done: list[Any] = []

    class Out:
        def dead_letter(self, item: Any, reason: str, error: str, stage: str) -> None:
            done.append(("dead", reason, stage))

        def done(self, item: Any) -> None:
            done.append(("done",))

        def publish(self, item: Any, messages: Any, on_acked: Any = None) -> None:
            done.append(("alert", [dict(m.headers)["ctd-signature"][:9] for m in messages]))

    handler._out = Out()
    body = verdict(conversation="c9").to_json()  # an expert verdict
    forged = dataclasses.replace(record(TopicPartition("verdicts", 0), 0, body), key=b"c9")
    await handler.accept([forged])
    by_worker = dataclasses.replace(forged, headers=tuple(role_signer("worker").headers("verdict", b"c9", body)))
    await handler.accept([by_worker])  # a compromised worker cannot speak for the expert
    assert done == [("dead", "bad_signature", "decode")] * 2
    refusals = handler.metrics.signature_refusals
    assert refusals.labels(kind="verdict", role="none", reason="missing")._value.get() == 1
    assert refusals.labels(kind="verdict", role="worker", reason="wrong_role")._value.get() == 1
    by_guard = dataclasses.replace(forged, headers=tuple(role_signer("guard").headers("verdict", b"c9", body)))
    await handler.accept([by_guard])
    assert done[-1] == ("alert", [b"v3:guard:"]), "a guard-signed harmful verdict alerts, and the alert is signed"
