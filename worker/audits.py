"""Which events the monitor worker audits: a keyed sample, per-tenant quotas and an audit budget of its own.

The sample is an HMAC of the event id under a secret (``audit.secret``; probes.calibration.recalibration.audit_selected): the
producer chooses event ids, and with a public hash it could choose which events are audited (1000 audited ids
found in 0.18 s), fill the audit window with them and move the cut. With the secret it cannot tell which are.
It can still send many events: each tenant's audits are rate-limited (``audit.tenant_rate_per_s``), all audits
together are held to their own budget (``audit.max_per_s``, apart from the delegation budget α: an audit never
counts as a delegation), and the recalibration feed keeps at most ``audit.tenant_share`` of the window per tenant
(worker/recalibration.py).

The quotas are token buckets per worker process, so a redelivered event may be audited where its first delivery
was not (or the reverse) when a quota was spent: an audit is a label for the window, not a decision.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from probes.calibration.recalibration import audit_selected
from probes.errors import ConfigError
from probes.logs import get_logger
from worker.alerts import TokenBucket
from worker.config import WorkerSettings
from worker.metrics import WorkerMetrics

log = get_logger(__name__)
#: Tenants whose audit buckets are kept (least recently audited dropped first): tenant names come from producers.
MAX_TENANT_BUCKETS = 10_000
Refusal = Literal["tenant_rate", "budget"]


def audit_secret_path(settings: WorkerSettings) -> Path | None:
    """``audit.secret_file``, else ``audit.secret`` in ``signing.keys_dir``; None when neither is set."""
    if settings.audit.secret_file is not None:
        return settings.audit.secret_file
    if settings.signing.keys_dir is not None:
        return settings.signing.keys_dir / "audit.secret"
    return None


def load_audit_secret(settings: WorkerSettings) -> bytes | None:
    """The secret keying the audit sample; ConfigError without one, unless ``signing.insecure_dev`` (None then:
    the sample falls back to the public hash, with a warning)."""
    path = audit_secret_path(settings)
    secret = path.read_bytes().strip() if path is not None and path.is_file() else b""
    if secret:
        return secret
    if not settings.signing.insecure_dev:
        raise ConfigError(
            f"audits need a secret keying the sample: {path or 'audit.secret_file / signing.keys_dir is not set'} "
            "is missing or empty. `ctd-monitor keys --out DIR` writes DIR/audit.secret; signing.insecure_dev=true "
            "runs audits on the public hash (development only)")
    log.warning("audit.INSECURE_DEV", consequence="audit selection is a public hash of the producer's event id: a "
                "producer can choose which of its events are audited")
    return None


class AuditSampler:
    """Decides, per event, whether it is audited: keyed hash, then the tenant's quota, then the audit budget."""

    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics, *, secret: bytes | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = settings.audit
        self.metrics = metrics
        self.secret = secret
        self.clock = clock
        self.budget = TokenBucket(self.config.max_per_s, self.config.burst, clock())
        self.tenants: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()

    def sampled(self, event_id: str) -> bool:
        """In the keyed sample (before any quota)."""
        return audit_selected(event_id, self.config.rate, self.config.salt, key=self.secret)

    def select(self, event_id: str, tenant: str, now: float | None = None) -> bool:
        """Whether this event is audited; a sampled event a quota refuses is counted by reason."""
        if not self.sampled(event_id):
            return False
        now = self.clock() if now is None else now
        refusal = self._refusal(tenant, now)
        if refusal is not None:
            self.metrics.audits_refused.labels(reason=refusal).inc()
            return False
        return True

    def _refusal(self, tenant: str, now: float) -> Refusal | None:
        bucket = self.tenants.get(tenant)
        if bucket is None:
            bucket = self.tenants[tenant] = TokenBucket(self.config.tenant_rate_per_s, self.config.tenant_burst, now)
            while len(self.tenants) > MAX_TENANT_BUCKETS:
                self.tenants.popitem(last=False)
        self.tenants.move_to_end(tenant)
        # The tenant's quota first: a tenant over its own quota must not spend the budget others audit with.
        if not bucket.available(now):
            return "tenant_rate"
        if not self.budget.take(now):
            return "budget"
        bucket.take(now)
        return None
