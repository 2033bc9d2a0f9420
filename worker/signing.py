"""Ed25519 signatures per role on the records the monitor writes, so a record its role did not write is refused.

Anyone who can produce to ``conversations`` (or, with loose ACLs, to ``verdicts`` or ``expert-review``) could
otherwise write a verdict that says an expert found a conversation safe, a review request the guard answers under
a real event's id, or a flood of fake verdicts. Two roles sign, each with its own private key:

* **worker** (the process that parses untrusted input): probe verdicts, review requests, stream verdicts;
* **guard**: expert verdicts (``expert``, ``expert_unavailable``, audit labels among them) and alerts (the worker
  signs the alerts of its streamed-response service, source ``stream``).

A verifier holds only public keys and accepts, per record kind, only the roles that may write it (``VERDICT_WRITER``
for verdicts: a worker key cannot mint an expert verdict or an audit label). The signature covers the version, the
role, the record kind, the key id, the signing time, the Kafka key and the body, so a signed review request cannot
be replayed as a verdict nor a verdict moved to another conversation, and a **freshness bound** refuses a signed
record replayed later: its signing time must be within ``signing.max_age_s`` of the time the broker appended it
(topics with ``message.timestamp.type=LogAppendTime``, as ``ctd-monitor topics create`` makes them), or of the
reader's clock on topics whose timestamps the producer sets.

Header ``ctd-signature``: ``v2:<role>:<key id>:<signed at, Unix ms>:<base64url signature>``; the key id is the
public key's fingerprint. Keys live in ``signing.keys_dir`` (``ctd-monitor keys`` writes them): ``<role>.key`` the
service's private key (PEM), ``<role>.pub`` and, while rotating, ``<role>.<name>.pub`` the public keys it trusts.
A service refuses to start without the keys it needs unless ``signing.insecure_dev`` is set (then it signs and
checks nothing it has no key for, logs a warning and sets ``ctd_signing_insecure`` to 1). Kafka ACLs remain the
first line (docs/deployment.md); the signatures are what still holds when they are wrong.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from probes.errors import ConfigError, CtdError
from probes.logs import get_logger
from worker.config import SigningConfig

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord
    from prometheus_client import Counter, Gauge

log = get_logger(__name__)

HEADER = "ctd-signature"
VERSION = "v2"
Role = Literal["worker", "guard"]
ROLES: tuple[Role, ...] = get_args(Role)
WORKER: tuple[Role, ...] = ("worker",)
GUARD: tuple[Role, ...] = ("guard",)
Kind = Literal["verdict", "review_request", "alert", "stream_verdict"]
Reason = Literal["missing", "malformed", "unknown_key", "wrong_role", "bad_signature", "stale", "future"]
Headers = Sequence[tuple[str, bytes]]
#: Which role may write a verdict of each ``source``: the guard alone speaks for the expert.
VERDICT_WRITER: Mapping[str, Role] = {"probe": "worker", "expert": "guard", "expert_unavailable": "guard"}
#: aiokafka's ``timestamp_type`` of a record whose timestamp the broker set when appending it.
LOG_APPEND_TIME = 1


class SignatureError(CtdError):
    """A record whose signature is missing, malformed, by a role that may not write it, wrong, or too old."""

    def __init__(self, reason: Reason, role: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: Reason = reason
        self.role = role


def key_id(public: Ed25519PublicKey) -> str:
    """A public key's fingerprint: the first 16 hex digits of SHA-256 over its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keys(directory: Path, roles: Collection[Role] = ROLES, *, overwrite: bool = False) -> dict[Role, str]:
    """A fresh key pair per role in ``directory`` (``<role>.key`` mode 0600, ``<role>.pub``): role → key id.

    An existing pair is kept unless ``overwrite``: the demo and the tests call this on every run.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ids: dict[Role, str] = {}
    for role in roles:
        private_path, public_path = directory / f"{role}.key", directory / f"{role}.pub"
        if private_path.exists() and public_path.exists() and not overwrite:
            ids[role] = key_id(_load_public(public_path))
            continue
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        public_path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
        ids[role] = key_id(private.public_key())
    return ids


def generate_audit_secret(directory: Path, *, overwrite: bool = False) -> Path:
    """``audit.secret`` in ``directory``: 32 random bytes (hex) keying the audit sample (probes.calibration.recalibration)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "audit.secret"
    if not path.exists() or overwrite:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(os.urandom(32).hex())
    return path


def _load_public(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key")
    return key


def _load_private(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key


def _public_keys(directory: Path, role: Role) -> dict[str, Ed25519PublicKey]:
    """Every public key of ``role`` in ``directory``: ``<role>.pub`` and rotation's ``<role>.<name>.pub``."""
    paths = [directory / f"{role}.pub", *sorted(directory.glob(f"{role}.*.pub"))]
    keys = [_load_public(p) for p in paths if p.is_file()]
    return {key_id(k): k for k in keys}


def _message(role: str, kind: str, kid: str, signed_ms: int, record_key: bytes | None, body: bytes) -> bytes:
    # Length-prefixed parts: no split of the parts can be re-cut into another tuple with the same bytes.
    parts = (VERSION.encode(), role.encode(), kind.encode(), kid.encode(), str(signed_ms).encode(),
             record_key if record_key is not None else b"\xff", body)
    return b"".join(len(p).to_bytes(8, "big") + p for p in parts)


@dataclass(frozen=True)
class Signed:
    """Who signed a verified record, with which key, and when (Unix seconds)."""

    role: Role
    key_id: str
    signed_at: float


@dataclass
class Signer:
    """Signs as one role and verifies the roles it trusts; ``Signer.from_config`` is the only way in.

    ``private`` None: this service signs nothing (only allowed under ``signing.insecure_dev``); a role missing from
    ``public`` and listed in ``unchecked``: its records are accepted unchecked (the same flag).
    """

    role: Role
    private: Ed25519PrivateKey | None
    public: dict[Role, dict[str, Ed25519PublicKey]]
    unchecked: frozenset[Role] = frozenset()
    max_age_s: float = 900.0
    max_skew_s: float = 60.0
    refusals: Counter | None = None
    _kid: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.private is not None:
            self._kid = key_id(self.private.public_key())

    @classmethod
    def from_config(cls, config: SigningConfig, role: Role, *, verifies: Collection[Role] = (),
                    signs: bool = True, service: str = "", refusals: Counter | None = None,
                    insecure_gauge: Gauge | None = None) -> Signer:
        """The signer of a service acting as ``role`` that reads records of the roles in ``verifies``.

        Raises ConfigError when a key the service needs is missing, unless ``signing.insecure_dev`` is set: then
        what is missing is skipped, with a warning and ``insecure_gauge`` at 1.
        """
        directory = config.keys_dir
        missing: list[str] = []
        private = None
        if signs:
            path = directory / f"{role}.key" if directory is not None else None
            if path is not None and path.is_file():
                private = _load_private(path)
            else:
                missing.append(f"{role}.key")
        public: dict[Role, dict[str, Ed25519PublicKey]] = {}
        for r in verifies:
            keys = _public_keys(directory, r) if directory is not None else {}
            if keys:
                public[r] = keys
            else:
                missing.append(f"{r}.pub")
        if missing and not config.insecure_dev:
            where = f"in {directory}" if directory is not None else "(signing.keys_dir is not set)"
            raise ConfigError(
                f"{service or role}: signing keys missing {where}: {', '.join(missing)}. Create them with "
                "`ctd-monitor keys --out DIR` and set signing.keys_dir (CTD_SIGNING__KEYS_DIR); for a local "
                "experiment only, signing.insecure_dev=true (CTD_SIGNING__INSECURE_DEV) runs without them")
        insecure = bool(missing)
        if insecure_gauge is not None and insecure:
            insecure_gauge.set(1)  # one process may build several signers: any insecure one shows
        if insecure:
            log.warning("signing.INSECURE_DEV", service=service or role, missing=missing,
                        consequence="records are written unsigned and/or accepted unchecked: anyone who can write "
                        "to the topics can forge verdicts and review requests; never run this in production")
        elif config.insecure_dev:
            log.warning("signing.insecure_dev_ignored", service=service or role,
                        reason="every key is present: everything is signed and checked")
        unchecked = frozenset(r for r in verifies if r not in public)
        return cls(role=role, private=private, public=public, unchecked=unchecked, max_age_s=config.max_age_s,
                   max_skew_s=config.max_skew_s, refusals=refusals)

    @property
    def signs(self) -> bool:
        return self.private is not None

    def headers(self, kind: Kind, record_key: bytes | None, body: bytes, *,
                now: float | None = None) -> list[tuple[str, bytes]]:
        """The header to publish with this record (none without a private key: insecure_dev only)."""
        if self.private is None:
            return []
        signed_ms = int((time.time() if now is None else now) * 1000)
        signature = self.private.sign(_message(self.role, kind, self._kid, signed_ms, record_key, body))
        encoded = base64.urlsafe_b64encode(signature).decode().rstrip("=")
        return [(HEADER, f"{VERSION}:{self.role}:{self._kid}:{signed_ms}:{encoded}".encode())]

    def refuse(self, kind: Kind, reason: Reason, role: str, detail: str) -> SignatureError:
        """Count a refusal (by kind, claimed role and reason) and return the error to raise."""
        if self.refusals is not None:
            self.refusals.labels(kind=kind, role=role or "none", reason=reason).inc()
        log.warning("signature.refused", kind=kind, role=role or "none", reason=reason, detail=detail[:300])
        return SignatureError(reason, role, f"{kind}: {detail}")

    def verify(self, kind: Kind, record_key: bytes | None, body: bytes, headers: Headers | None, *,
               roles: Collection[Role], appended_at: float | None = None, now: float | None = None,
               max_age_s: float | None = None) -> Signed | None:
        """Who of ``roles`` signed exactly this record, or SignatureError (counted); None when unchecked.

        ``appended_at``: the broker's append time (LogAppendTime), the reference of the freshness bound;
        else the reader's clock ``now``. ``max_age_s`` overrides ``signing.max_age_s`` for this read.
        """
        values = [value for name, value in headers or () if name == HEADER]
        if not values and set(roles) <= self.unchecked:
            return None  # insecure_dev without these roles' keys: accepted unchecked, as the flag says
        if len(values) != 1:
            raise self.refuse(kind, "missing", "", f"expected one {HEADER} header, found {len(values)}")
        try:
            version, role, kid, signed_ms_text, encoded = values[0].decode("ascii").split(":")
            signed_ms = int(signed_ms_text)
            signature = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except (UnicodeDecodeError, ValueError) as exc:
            raise self.refuse(kind, "malformed", "", f"malformed {HEADER} header") from exc
        if version != VERSION:
            raise self.refuse(kind, "malformed", "", f"unsupported signature version {version!r}")
        if role not in roles:
            raise self.refuse(kind, "wrong_role", role, f"role {role!r} may not write this record")
        if role in self.unchecked:
            return None
        key = self.public.get(role, {}).get(kid)  # type: ignore[call-overload]
        if key is None:
            raise self.refuse(kind, "unknown_key", role, f"signed with unknown {role} key {kid!r}")
        try:
            key.verify(signature, _message(role, kind, kid, signed_ms, record_key, body))
        except InvalidSignature:
            raise self.refuse(kind, "bad_signature", role, "signature does not match the record") from None
        signed_at = signed_ms / 1000
        reference = appended_at if appended_at is not None else (time.time() if now is None else now)
        limit = self.max_age_s if max_age_s is None else max_age_s
        if reference - signed_at > limit:
            raise self.refuse(kind, "stale", role, f"signed {reference - signed_at:.0f}s before it was "
                              f"{'appended' if appended_at is not None else 'read'} (max {limit:.0f}s): a replay")
        if signed_at - reference > self.max_skew_s:
            raise self.refuse(kind, "future", role, f"signed {signed_at - reference:.0f}s in the future")
        return Signed(role, kid, signed_at)  # type: ignore[arg-type]

    def verify_record(self, kind: Kind, record: ConsumerRecord[bytes, bytes], *, roles: Collection[Role],
                      now: float | None = None, max_age_s: float | None = None) -> Signed | None:
        """``verify`` on a consumed record: its append time is the freshness reference when the broker set it."""
        appended = record.timestamp / 1000 if record.timestamp_type == LOG_APPEND_TIME else None
        return self.verify(kind, record.key, record.value or b"", record.headers, roles=roles, appended_at=appended,
                           now=now, max_age_s=max_age_s)
