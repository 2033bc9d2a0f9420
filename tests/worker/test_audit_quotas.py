"""The audit sample keyed by a secret, per-tenant quotas, the audit budget and the window share (worker/audits.py,
probes.calibration.recalibration) — unit tests; test_hostile_audits runs an audit-grinding producer on the real broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from probes.calibration.recalibration import OnlineRecalibrator, audit_selected
from probes.errors import ConfigError
from tests.worker.helpers import signing_config
from worker.audits import AuditSampler, load_audit_secret
from worker.config import SigningConfig, WorkerAuditConfig, WorkerSettings
from worker.metrics import WorkerMetrics
from worker.recalibration import tenant_cap


def settings(**audit: object) -> WorkerSettings:
    return WorkerSettings(audit=WorkerAuditConfig(**{"rate": 0.5, **audit}), signing=signing_config())


def grind(n: int, rate: float, salt: str = "audit") -> list[str]:
    """What a producer finds when the sample is a public hash: event ids it knows will be audited."""
    out, i = [], 0
    while len(out) < n:
        if audit_selected(f"grind-{i}", rate, salt):
            out.append(f"grind-{i}")
        i += 1
    return out


def test_the_keyed_sample_cannot_be_ground_from_the_public_salt() -> None:
    s = settings(rate=0.1)
    sampler = AuditSampler(s, WorkerMetrics(), secret=load_audit_secret(s))
    ground = grind(2000, 0.1)
    chosen = sum(sampler.sampled(e) for e in ground)
    assert 140 < chosen < 260, "the ground ids are audited at the base rate (≈200), not all 2000"
    other = AuditSampler(s, WorkerMetrics(), secret=b"another secret")
    assert [sampler.sampled(e) for e in ground[:200]] != [other.sampled(e) for e in ground[:200]]
    assert all(sampler.sampled(e) == sampler.sampled(e) for e in ground[:200]), "deterministic per event"


def test_audits_refuse_to_run_without_a_secret_unless_the_dev_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="audit"):
        load_audit_secret(WorkerSettings(audit=WorkerAuditConfig(rate=0.1), signing=SigningConfig(keys_dir=tmp_path)))
    assert load_audit_secret(WorkerSettings(audit=WorkerAuditConfig(rate=0.1),
                                            signing=SigningConfig(keys_dir=tmp_path, insecure_dev=True))) is None
    secret = tmp_path / "elsewhere.secret"
    secret.write_text("s3cret\n")
    assert load_audit_secret(WorkerSettings(audit=WorkerAuditConfig(rate=0.1, secret_file=secret))) == b"s3cret"


def test_a_tenant_gets_its_audit_rate_and_no_more_and_the_budget_holds_for_all() -> None:
    s = settings(rate=1.0, tenant_rate_per_s=2.0, tenant_burst=5, max_per_s=10.0, burst=12)
    metrics = WorkerMetrics()
    sampler = AuditSampler(s, metrics, secret=b"k", clock=lambda: 0.0)
    # a flood from one tenant within one second: its burst, then nothing
    flood = sum(sampler.select(f"f{i}", "noisy", now=0.0) for i in range(1000))
    assert flood == 5
    assert sampler.select("q0", "quiet", now=0.0), "another tenant still audits"
    # ten seconds later the tenant has its rate back (a full burst), never more
    assert sum(sampler.select(f"g{i}", "noisy", now=10.0) for i in range(100)) == 5
    # many tenants together stay within the audit budget (12 in a burst at t=10, the budget refilled to it)
    many = sum(sampler.select(f"m{t}-{i}", f"tenant-{t}", now=10.0) for t in range(50) for i in range(3))
    assert many <= 12 - 5
    refused = metrics.audits_refused
    assert refused.labels(reason="tenant_rate")._value.get() >= 995 + 95
    assert refused.labels(reason="budget")._value.get() > 0


def test_one_tenant_never_holds_more_than_its_share_of_the_window() -> None:
    config = WorkerAuditConfig(rate=1.0, window=40, min_window=10, tenant_share=0.25)
    recal = OnlineRecalibrator(config, offline_cut=0.5, group_cap=tenant_cap(config))
    assert recal.group_cap == 10
    for i in range(20):
        recal.add(0.2, False, group=f"honest-{i % 4}")
    displaced = [recal.add(0.99, False, group="grinder") for _ in range(500)]
    assert recal.group_count("grinder") == 10 and recal.window_size == 30
    assert sum(displaced) == 490, "its newest replace its oldest"
    assert [recal.group_count(f"honest-{i}") for i in range(4)] == [5] * 4, "the honest tenants' audits stay"
    for i in range(100):  # the window still slides: the oldest leave as new ones come
        recal.add(0.3, True, group=f"t{i % 10}")
    assert recal.window_size == 40 and recal.group_count("honest-0") == 0 and recal.group_count("grinder") == 0
    assert sum(recal.group_count(f"t{i}") for i in range(10)) == 40
