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

One signature covers a batch of records: each record is a leaf of a Merkle tree (RFC 9162's hashing: a leaf is
SHA-256 over ``0x00`` and the record's signed parts, a node SHA-256 over ``0x01`` and its children) and the key
signs the tree's root, size, role, key id and signing time; each record carries the signature and its inclusion
path. Ed25519 signing costs ~30 µs a record on a 2-core host, a seventh of the worker's CPU per event; hashing
costs ~1 µs, so a batch of 64 verdicts is signed for the price of one. A verifier recomputes the root from the
record and its path and checks the signature once per batch (later records of the batch hit a cache of verified
roots). A record cannot be moved: its leaf binds its kind, Kafka key and body, and its position and the tree size
are fixed by the path (RFC 9162 §2.1.3.2). One record alone is a tree of size one (an empty path).

Header ``ctd-signature``: ``v3:<role>:<key id>:<signed at, Unix ms>:<leaf index>:<tree size>:<base64url
signature>:<base64url path>`` (the path: the sibling hashes, 32 bytes each, leaf upward); the key id is the
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
import threading
import time
from collections import OrderedDict
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
VERSION = "v3"
Role = Literal["worker", "guard"]
ROLES: tuple[Role, ...] = get_args(Role)
WORKER: tuple[Role, ...] = ("worker",)
GUARD: tuple[Role, ...] = ("guard",)
Kind = Literal["verdict", "review_request", "alert", "stream_verdict", "response_state"]
Reason = Literal["missing", "malformed", "unknown_key", "wrong_role", "bad_signature", "stale", "future"]
Headers = Sequence[tuple[str, bytes | None]]  # a Kafka header value may be null (aiokafka: None)
#: Which role may write a verdict of each ``source``: the guard alone speaks for the expert.
VERDICT_WRITER: Mapping[str, Role] = {"probe": "worker", "expert": "guard", "expert_unavailable": "guard"}
#: aiokafka's ``timestamp_type`` of a record whose timestamp the broker set when appending it.
LOG_APPEND_TIME = 1
#: Records per signature at most: bounds the header (8 sibling hashes, 256 bytes) and what one bad tree can touch.
MAX_TREE = 256
_DIGEST = 32
_MAX_PATH_BYTES = _DIGEST * (MAX_TREE - 1).bit_length()
# Verified (root message, signature) pairs kept so the rest of a batch skips Ed25519: a few batches' worth.
_VERIFIED_ROOTS = 1024


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


def _framed(*parts: bytes) -> bytes:
    # Length-prefixed parts: no split of the parts can be re-cut into another tuple with the same bytes.
    return b"".join(len(p).to_bytes(8, "big") + p for p in parts)


def _leaf(role: str, kind: str, kid: str, record_key: bytes | None, body: bytes) -> bytes:
    """A record's leaf hash: what it is (role, kind, key id), where it goes (its Kafka key or none) and its body."""
    key = b"" if record_key is None else b"k" + record_key  # a missing key differs from every key, the empty one too
    return hashlib.sha256(b"\x00" + _framed(VERSION.encode(), role.encode(), kind.encode(), kid.encode(), key,
                                            body)).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _root_message(role: str, kid: str, signed_ms: int, size: int, root: bytes) -> bytes:
    """What the key signs for a batch: the tree's root and size, by whom and when."""
    return _framed(VERSION.encode(), b"root", role.encode(), kid.encode(), str(signed_ms).encode(),
                   str(size).encode(), root)


def merkle_tree(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """RFC 9162's Merkle tree hash of ``leaves`` (≥ 1) and every leaf's inclusion path, leaf upward."""
    if len(leaves) == 1:
        return leaves[0], [[]]
    split = 1 << ((len(leaves) - 1).bit_length() - 1)  # the largest power of two below the size
    left, left_paths = merkle_tree(leaves[:split])
    right, right_paths = merkle_tree(leaves[split:])
    for path in left_paths:
        path.append(right)
    for path in right_paths:
        path.append(left)
    return _node(left, right), left_paths + right_paths


def root_from_path(index: int, size: int, leaf: bytes, path: Sequence[bytes]) -> bytes | None:
    """The root a leaf at ``index`` of a tree of ``size`` leads to along ``path`` (RFC 9162 §2.1.3.2), or None
    when the path does not fit that position (too short, too long, index out of range)."""
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for sibling in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = _node(sibling, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = _node(r, sibling)
        fn, sn = fn >> 1, sn >> 1
    return r if sn == 0 else None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


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
    _verified: OrderedDict[tuple[str, bytes, bytes], None] = field(default_factory=OrderedDict, init=False)
    # Readers verify on the event loop today; the lock keeps the cache whole should one verify on threads.
    _verified_lock: threading.Lock = field(default_factory=threading.Lock, init=False)

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
        return self.headers_many([(kind, record_key, body)], now=now)[0]

    def headers_many(self, records: Sequence[tuple[Kind, bytes | None, bytes]], *,
                     now: float | None = None) -> list[list[tuple[str, bytes]]]:
        """Each record's header, one signature per ``MAX_TREE`` records: (kind, Kafka key, body) in, in order."""
        if self.private is None:
            return [[] for _ in records]
        signed_ms = int((time.time() if now is None else now) * 1000)
        out: list[list[tuple[str, bytes]]] = []
        for start in range(0, len(records), MAX_TREE):
            chunk = records[start:start + MAX_TREE]
            root, paths = merkle_tree([_leaf(self.role, kind, self._kid, key, body) for kind, key, body in chunk])
            signature = _b64(self.private.sign(_root_message(self.role, self._kid, signed_ms, len(chunk), root)))
            prefix = f"{VERSION}:{self.role}:{self._kid}:{signed_ms}:"
            out.extend([(HEADER, f"{prefix}{i}:{len(chunk)}:{signature}:{_b64(b''.join(path))}".encode())]
                       for i, path in enumerate(paths))
        return out

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
        if not isinstance(values[0], bytes):  # Kafka headers may be null, and aiokafka hands them over as None
            raise self.refuse(kind, "malformed", "", f"{HEADER} header without a value")
        try:
            version, role, kid, signed_ms_text, index_text, size_text, encoded, path_text = (
                values[0].decode("ascii").split(":"))
            signed_ms, index, size = int(signed_ms_text), int(index_text), int(size_text)
            signature, path_bytes = _unb64(encoded), _unb64(path_text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise self.refuse(kind, "malformed", "", f"malformed {HEADER} header") from exc
        if version != VERSION:
            raise self.refuse(kind, "malformed", "", f"unsupported signature version {version!r}")
        if not 0 < size <= MAX_TREE or len(path_bytes) % _DIGEST or len(path_bytes) > _MAX_PATH_BYTES:
            raise self.refuse(kind, "malformed", "", f"malformed {HEADER} header: tree size {size}")
        if role not in roles:
            raise self.refuse(kind, "wrong_role", role, f"role {role!r} may not write this record")
        if role in self.unchecked:
            return None
        key = self.public.get(role, {}).get(kid)  # type: ignore[call-overload]
        if key is None:
            raise self.refuse(kind, "unknown_key", role, f"signed with unknown {role} key {kid!r}")
        path = [path_bytes[i:i + _DIGEST] for i in range(0, len(path_bytes), _DIGEST)]
        root = root_from_path(index, size, _leaf(role, kind, kid, record_key, body), path)
        if root is None:
            raise self.refuse(kind, "malformed", role, f"inclusion path does not fit leaf {index} of {size}")
        message = _root_message(role, kid, signed_ms, size, root)
        if not self._seen(kid, message, signature):
            try:
                key.verify(signature, message)
            except InvalidSignature:
                raise self.refuse(kind, "bad_signature", role, "signature does not match the record") from None
            self._remember(kid, message, signature)
        signed_at = signed_ms / 1000
        reference = appended_at if appended_at is not None else (time.time() if now is None else now)
        limit = self.max_age_s if max_age_s is None else max_age_s
        if reference - signed_at > limit:
            raise self.refuse(kind, "stale", role, f"signed {reference - signed_at:.0f}s before it was "
                              f"{'appended' if appended_at is not None else 'read'} (max {limit:.0f}s): a replay")
        if signed_at - reference > self.max_skew_s:
            raise self.refuse(kind, "future", role, f"signed {signed_at - reference:.0f}s in the future")
        return Signed(role, kid, signed_at)  # type: ignore[arg-type]

    def _seen(self, kid: str, message: bytes, signature: bytes) -> bool:
        # Only an exact (root message, signature) pair verified before is skipped: a record maps to that root
        # only if its leaf and path hash to it, so the cache never accepts what Ed25519 would refuse.
        entry = (kid, message, signature)
        with self._verified_lock:
            if entry in self._verified:
                self._verified.move_to_end(entry)
                return True
            return False

    def _remember(self, kid: str, message: bytes, signature: bytes) -> None:
        with self._verified_lock:
            self._verified[(kid, message, signature)] = None
            if len(self._verified) > _VERIFIED_ROOTS:
                self._verified.popitem(last=False)

    def verify_record(self, kind: Kind, record: ConsumerRecord[bytes, bytes], *, roles: Collection[Role],
                      now: float | None = None, max_age_s: float | None = None) -> Signed | None:
        """``verify`` on a consumed record: its append time is the freshness reference when the broker set it."""
        appended = record.timestamp / 1000 if record.timestamp_type == LOG_APPEND_TIME else None
        return self.verify(kind, record.key, record.value or b"", record.headers, roles=roles, appended_at=appended,
                           now=now, max_age_s=max_age_s)
