"""Stage 1b of an event: which tenant it belongs to, from a place the producer cannot forge (``tenant.source``).

Every isolation mechanism (budget scopes, the fair queue and batcher, alert buckets, sink shares) keys on the
tenant this module resolves, never on the producer-written ``tenant`` field unless ``tenant.source`` is
``payload``. The payload's claim is kept (``Tenancy.claimed``) so the verdict can record it. ``TenantSlots`` bounds
the per-tenant tables that must not grow with the names seen (budget windows, metric label values).
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from probes.errors import ConfigError
from probes.logs import get_logger
from worker.config import TenantConfig
from worker.signing import Headers
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

    def resolve(self, topic: str, headers: Headers | None, event_id: str,
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


class TenantSlots:
    """Which tenants hold an entry of their own in a bounded per-tenant table (budget windows, metric labels).

    ``pinned`` tenants always do. Of the others, at most ``capacity`` do: a new tenant takes the place of the least
    recently used one once no lookup used it for ``idle_after`` lookups (``on_evict`` then drops its state); while
    every place is in use, new tenants share the table's overflow entry. So the first tenants seen never pin the
    table, rotating names cannot grow it, and they cannot evict an active tenant. The clock counts lookups, not
    seconds: replicas fed alike evict alike.
    """

    def __init__(self, capacity: int, idle_after: int, pinned: Iterable[str] = (),
                 on_evict: Callable[[str, int], None] | None = None) -> None:
        self.capacity = capacity
        self.idle_after = idle_after
        self.pinned = frozenset(pinned)
        self.on_evict = on_evict  # (tenant, lookups since it was last used)
        self.clock = 0
        self.evictions = 0
        self._last_used: collections.OrderedDict[str, int] = collections.OrderedDict()  # least recently used first

    def __contains__(self, tenant: object) -> bool:
        """Whether ``tenant`` holds an entry now (no lookup: the clock and the order stay as they are)."""
        return tenant in self.pinned or tenant in self._last_used

    def __len__(self) -> int:
        """Unpinned tenants holding an entry (at most ``capacity``)."""
        return len(self._last_used)

    def use(self, tenant: str) -> bool:
        """One lookup for ``tenant``: True when it holds (or now takes) an entry of its own, False when it shares
        the overflow entry."""
        pinned = tenant in self.pinned
        own = (pinned or tenant in self._last_used or len(self._last_used) < self.capacity
               or self._evict_idle())
        self.clock += 1
        if own and not pinned:
            self._last_used[tenant] = self.clock
            self._last_used.move_to_end(tenant)
        return own

    def _evict_idle(self) -> bool:
        """Drop the least recently used tenant if it is idle; False when every entry is in use."""
        oldest = next(iter(self._last_used.items()), None)
        if oldest is None or self.clock - oldest[1] < self.idle_after:
            return False
        tenant, last_used = oldest
        del self._last_used[tenant]
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(tenant, self.clock - last_used)
        return True
