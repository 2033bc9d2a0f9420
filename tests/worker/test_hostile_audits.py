"""An audit-grinding producer on the real broker (``pytest -m hostile``): monitor worker → audits → guard (real small
expert) → audit labels → the worker's recalibration window.

The producer writes, with a plain aiokafka producer, 300 events whose ids it ground so that the public hash of the
old audit sample selects every one of them (salt "audit", rate 0.2), all as one tenant. With the keyed sample, the
per-tenant audit rate and the window share: only about the base rate of them is sampled, fewer still are sent to the
expert, its audits hold at most its share of the window, the window never fills from them alone so the cut does not
move, and no audit counts as a delegation.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from probes.experts.encoder_head import EncoderHeadExpert
from probes.runtime.monitor import Monitor
from tests.worker.helpers import dataset_events, event_values, produce_at_rate, wait_for
from tests.worker.test_audit_kafka import start_pair
from tests.worker.test_audit_quotas import grind
from worker.config import TenantConfig, WorkerAuditConfig
from worker.recalibration import tenant_cap

pytestmark = [pytest.mark.hostile, pytest.mark.kafka]

N = 300
RATE = 0.2


async def test_an_audit_grinding_producer_gets_no_more_than_its_quota_and_cannot_move_the_cut(
    kafka_broker: Any, small_bundle: Path, cache_dir: Path, monitor: Monitor, datasets_dir: Path,
    small_expert: EncoderHeadExpert,
) -> None:
    audit = WorkerAuditConfig(rate=RATE, window=40, min_window=20, refit_every=1, epsilon=0.2, delta=0.2,
                              settle_s=0.2, lookback_s=600, tenant_share=0.25, tenant_rate_per_s=1.0,
                              tenant_burst=25)
    running = await start_pair(kafka_broker, small_bundle, cache_dir, monitor, small_expert, audit)
    metrics, topics, verdicts = running.metrics, running.topics, running.verdicts
    recal = running.worker.handler.recalibrator
    assert recal is not None
    ground = grind(N, RATE)
    files = [datasets_dir / "harmbench.jsonl", datasets_dir / "alpaca_benign.jsonl"]
    events = [e.model_copy(update={"event_id": gid, "tenant": "grinder"})
              for e, gid in zip(dataset_events(files, N), ground, strict=True)]
    started = time.monotonic()
    try:
        await produce_at_rate(kafka_broker.bootstrap, topics.input, event_values(events))
        await verdicts.wait(lambda w: len({r["event_id"] for r in w.records if r["source"] == "probe"}) == N, 180)
        elapsed = time.monotonic() - started
        sent = metrics.audits_sent._value.get()
        # every audit the worker sent comes back as a label and is fed (or replaces its tenant's oldest)
        await wait_for(lambda: metrics.audit_verdicts_in._value.get() == sent, 120)
        await wait_for(lambda: recal.window_size == min(sent, tenant_cap(audit)), 30)
    finally:
        await verdicts.stop()
    refused = metrics.audits_refused.labels(reason="tenant_rate")._value.get()
    # the ground ids are sampled at about the base rate, not all of them (the public hash chose all 300)
    assert sent + refused < 0.4 * N
    # the tenant's audit rate: its burst plus its rate over the run, however many it sampled
    assert 0 < sent <= audit.tenant_burst + audit.tenant_rate_per_s * elapsed + 1 and refused > 0
    # its share of the window, its newest replacing its oldest; the producer is the tenant of the topic it writes
    # to (tenant.source: topic), whatever its events claim
    assert recal.group_count(TenantConfig().default) == recal.window_size <= tenant_cap(audit) == 10
    assert metrics.audit_tenant_displaced._value.get() == sent - recal.window_size
    # below min_window: no refit, the bundle's cut still decides every verdict
    assert recal.state.version == 0 and recal.state.source == "offline"
    assert metrics.recalibration_window_cut._value.get() == 0
    probe = [r for r in verdicts.records if r["source"] == "probe"]
    assert all(r["recalibration"]["version"] == 0 and r["recalibration"]["source"] == "offline" for r in probe)
    # audits on their own budget: none of them counts as a delegation
    delegated = sum(r["delegated"] for r in probe)
    assert metrics.delegated._value.get() == delegated
    assert abs(metrics.delegation_rate._value.get() - delegated / N) < 1e-9
    assert sum(w.delegated for w in running.worker.handler.budget.windows.values()) == delegated
    await running.stop()
