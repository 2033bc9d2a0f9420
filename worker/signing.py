"""HMAC signatures on the records the monitor writes, so a record nobody holding the key wrote is refused.

Anyone who can produce to ``conversations`` (or, with loose ACLs, to ``verdicts``) could otherwise write a
verdict that says an expert found a conversation safe, or flood the alerter with fake ones. The worker and the
guard sign every verdict, review request and alert with HMAC-SHA256 under a key from a Secret; the guard and the
alerter verify before they act. The signature covers a domain tag (what kind of record it is), the Kafka key and
the body, so a signed review request cannot be replayed as a verdict nor a verdict moved to another conversation.

Header ``ctd-signature``: ``v1:<key id>:<hex digest>``. Kafka ACLs remain the first line (docs/deployment.md);
the signature is what still holds when they are wrong.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from probes.errors import ConfigError, CtdError
from worker.config import SigningConfig

HEADER = "ctd-signature"
VERSION = "v1"
Kind = Literal["verdict", "review_request", "alert"]
Headers = Sequence[tuple[str, bytes]]


class SignatureError(CtdError):
    """A record whose signature is missing, malformed, made with an unknown key, or wrong."""


@dataclass(frozen=True)
class Signer:
    """Signs and verifies records for one key set; ``Signer.from_config`` is the only way in."""

    key_id: str | None
    keys: Mapping[str, bytes]

    @classmethod
    def from_config(cls, config: SigningConfig) -> Signer:
        if config.required and not config.enabled:
            raise ConfigError("signing.required is set but no signing.key is configured (CTD_SIGNING__KEY)")
        keys = {kid: secret.get_secret_value().encode() for kid, secret in config.verify_keys.items()}
        if config.enabled:
            assert config.key is not None
            keys[config.key_id] = config.key.get_secret_value().encode()
        return cls(key_id=config.key_id if config.enabled else None, keys=keys)

    @property
    def enabled(self) -> bool:
        return self.key_id is not None

    def _digest(self, key: bytes, kind: Kind, record_key: bytes | None, body: bytes) -> str:
        mac = hmac.new(key, digestmod=hashlib.sha256)
        # Length-prefixed parts: no (key, body) split can be re-cut into another pair with the same MAC input.
        for part in (VERSION.encode(), kind.encode(), record_key if record_key is not None else b"\xff", body):
            mac.update(len(part).to_bytes(8, "big"))
            mac.update(part)
        return mac.hexdigest()

    def headers(self, kind: Kind, record_key: bytes | None, body: bytes) -> list[tuple[str, bytes]]:
        """The header to publish with this record (none when signing is off)."""
        if self.key_id is None:
            return []
        digest = self._digest(self.keys[self.key_id], kind, record_key, body)
        return [(HEADER, f"{VERSION}:{self.key_id}:{digest}".encode())]

    def verify(self, kind: Kind, record_key: bytes | None, body: bytes, headers: Headers | None) -> None:
        """Raise SignatureError unless a key this signer knows signed exactly this record.

        With signing off (no key configured) every record passes: a demo needs no Secret.
        """
        if self.key_id is None:
            return
        values = [value for name, value in headers or () if name == HEADER]
        if len(values) != 1:
            raise SignatureError(f"{kind}: expected one {HEADER} header, found {len(values)}")
        try:
            version, key_id, digest = values[0].decode("ascii").split(":")
        except (UnicodeDecodeError, ValueError) as exc:
            raise SignatureError(f"{kind}: malformed {HEADER} header") from exc
        if version != VERSION:
            raise SignatureError(f"{kind}: unsupported signature version {version!r}")
        key = self.keys.get(key_id)
        if key is None:
            raise SignatureError(f"{kind}: signed with unknown key id {key_id!r}")
        if not hmac.compare_digest(digest, self._digest(key, kind, record_key, body)):
            raise SignatureError(f"{kind}: signature does not match the record")
