"""The gateway's tenant header: HMAC-SHA256 of (event id, tenant, timestamp) under the gateway's secret.

A gateway in front of Kafka authenticates the caller, then writes the event with two headers:
``ctd-tenant: <tenant>`` and ``ctd-tenant-auth: v1:<unix seconds>:<hex digest>``. The digest binds the tenant to
one event id and one time, so a producer that copies a header from another event (or makes one up) gets no
tenant but ``tenant.unverified``. This is not worker/signing.py: that one signs the records the services write;
this one is the gateway's statement about who wrote an input.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.signing import Headers

TENANT_HEADER = "ctd-tenant"
AUTH_HEADER = "ctd-tenant-auth"
VERSION = "v1"
_DOMAIN = b"ctd-tenant-gateway"


class TenantAuthError(Exception):
    """The gateway header is missing, malformed, stale or does not match; ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _digest(secret: bytes, event_id: str, tenant: str, timestamp: int) -> str:
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    # Length-prefixed parts: no (event id, tenant) split can be re-cut into another pair with the same input.
    for part in (_DOMAIN, event_id.encode(), tenant.encode(), str(timestamp).encode()):
        mac.update(len(part).to_bytes(8, "big"))
        mac.update(part)
    return mac.hexdigest()


def gateway_headers(secret: bytes, event_id: str, tenant: str, timestamp: int) -> list[tuple[str, bytes]]:
    """The two headers a trusted gateway sets on an event (tests and the reference gateway use this)."""
    return [(TENANT_HEADER, tenant.encode()),
            (AUTH_HEADER, f"{VERSION}:{timestamp}:{_digest(secret, event_id, tenant, timestamp)}".encode())]


def verify_gateway(secret: bytes, event_id: str, headers: Headers | None, *, now: float,
                   max_age_s: float | None) -> str:
    """The tenant the gateway vouched for on this event, or TenantAuthError."""
    tenants = [v for k, v in headers or () if k == TENANT_HEADER]
    auths = [v for k, v in headers or () if k == AUTH_HEADER]
    if not tenants and not auths:
        raise TenantAuthError("missing", "no gateway tenant header")
    if len(tenants) != 1 or len(auths) != 1:
        raise TenantAuthError("malformed", f"{len(tenants)} {TENANT_HEADER} and {len(auths)} {AUTH_HEADER} headers")
    if not isinstance(tenants[0], bytes) or not isinstance(auths[0], bytes):  # a null header value (aiokafka: None)
        raise TenantAuthError("malformed", "gateway tenant header without a value")
    try:
        tenant = tenants[0].decode("utf-8")
        version, stamp, digest = auths[0].decode("ascii").split(":")
        timestamp = int(stamp)
    except (UnicodeDecodeError, ValueError) as exc:
        raise TenantAuthError("malformed", "undecodable gateway tenant header") from exc
    if version != VERSION or not tenant or len(tenant) > 256:
        raise TenantAuthError("malformed", f"version {version!r}, tenant of {len(tenant)} characters")
    if not hmac.compare_digest(digest, _digest(secret, event_id, tenant, timestamp)):
        raise TenantAuthError("mismatch", "the gateway digest does not match this event id, tenant and time")
    if max_age_s is not None and now - timestamp > max_age_s:
        raise TenantAuthError("stale", f"gateway timestamp {now - timestamp:.0f}s old > {max_age_s:g}s")
    return tenant
