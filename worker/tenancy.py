"""Stage 1b of an event: which tenant it belongs to, from a place the producer cannot forge (``tenant.source``).

Every isolation mechanism (budget scopes, the fair queue and batcher, alert buckets, sink shares) keys on the
tenant this module resolves, never on the producer-written ``tenant`` field unless ``tenant.source`` is
``payload``. The payload's claim is kept (``Tenancy.claimed``) so the verdict can record it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from probes.errors import ConfigError
from probes.logs import get_logger
from worker.config import TenantConfig
from worker.tenant_auth import TenantAuthError, verify_gateway

log = get_logger(__name__)
# A Kafka topic name is at most 249 characters of [A-Za-z0-9._-]; a tenant suffix never starts with a dot.
_TENANT_SUFFIX = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"


@dataclass(frozen=True, slots=True)
class Tenancy:
    """An event's tenant (what isolation keys on), what its payload claimed, and why it is unverified if so."""

    tenant: str
    claimed: str
    unverified: str | None = None  # the reason (header source), None when the source vouched for ``tenant``


def tenant_topic(input_topic: str, tenant: str) -> str:
    """The input topic of one tenant under ``tenant.source: topic``."""
    if not re.fullmatch(_TENANT_SUFFIX, tenant):
        raise ConfigError(f"tenant {tenant!r} cannot name a Kafka topic: use [A-Za-z0-9._-], not starting with '.'")
    return f"{input_topic}.{tenant}"


def subscription_pattern(input_topic: str) -> str:
    """The plain input topic and every ``<input>.<tenant>`` topic (aiokafka matches it on each metadata refresh)."""
    return f"^{re.escape(input_topic)}(\\.{_TENANT_SUFFIX})?$"


class TenantResolver:
    """Resolves each event's tenant from the configured source; one per worker."""

    def __init__(self, config: TenantConfig, input_topic: str) -> None:
        self.config = config
        self.input_topic = input_topic
        self._prefix = input_topic + "."
        self._secret: bytes | None = None
        if config.source == "header":
            secret = config.gateway_secret.get_secret_value() if config.gateway_secret is not None else ""
            if not secret:
                raise ConfigError("tenant.source is header but no tenant.gateway_secret is configured "
                                  "(CTD_TENANT__GATEWAY_SECRET)")
            self._secret = secret.encode()

    def log_source(self) -> None:
        """Say at start where tenants come from; the payload source loudly, as it is forgeable."""
        c = self.config
        if c.source == "payload":
            log.warning("tenant.source_insecure", source="payload",
                        hint="any producer can claim any tenant: budget, fairness and alert isolation are only as "
                             "good as the producers; use tenant.source topic or header in production")
        else:
            log.info("tenant.source", source=c.source, default=c.default, unverified=c.unverified,
                     pattern=subscription_pattern(self.input_topic) if c.source == "topic" else None)

    @property
    def pattern(self) -> str | None:
        """The topic pattern to subscribe to (topic source), else None: the plain input topic only."""
        return subscription_pattern(self.input_topic) if self.config.source == "topic" else None

    def resolve(self, topic: str, headers: Sequence[tuple[str, bytes]] | None, event_id: str,
                claimed: str, now: float | None = None) -> Tenancy:
        c = self.config
        if c.source == "payload":
            return Tenancy(claimed, claimed)
        if c.source == "topic":
            suffix = topic[len(self._prefix):] if topic.startswith(self._prefix) else ""
            return Tenancy(suffix or c.default, claimed)
        assert self._secret is not None
        try:
            tenant = verify_gateway(self._secret, event_id, headers, now=time.time() if now is None else now,
                                    max_age_s=c.gateway_max_age_s)
        except TenantAuthError as exc:
            return Tenancy(c.unverified, claimed, exc.reason)
        return Tenancy(tenant, claimed)
