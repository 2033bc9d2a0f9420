"""Stage 1 of an event: Kafka bytes → a validated ``ConversationEvent``, or the one reason it is bad.

Input limits are enforced while decoding, and every way an input can be bad maps to one ``DecodeError``
reason, so it can be dead-lettered with it.

Whatever decodes must also serialise again: metadata is bounded in depth and size (``worker.max_metadata_*``;
pydantic and orjson refuse to serialise deep nesting, so an unbounded event would decode and then fail inside
its verdict, in the middle of a batch).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import orjson
from pydantic import ValidationError

from worker.events import (
    MAX_EVENT_BYTES,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    ConversationEvent,
    ResponseChunk,
    Verdict,
)
from worker.signing import ROLES, VERDICT_WRITER, Role, Signer

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"

DecodeReason = Literal[
    "undecodable_utf8", "invalid_json", "schema_violation", "oversize", "empty_conversation",
    "metadata_too_deep", "metadata_too_large",
]


class DecodeError(Exception):
    def __init__(self, reason: DecodeReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: DecodeReason = reason
        self.detail = detail


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``{}`` is 1), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _check_metadata(obj: dict[str, Any], max_depth: int, max_bytes: int) -> None:
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return  # absent (default {}) or not an object: the schema check names it
    depth = _depth(metadata)
    if depth > max_depth:
        raise DecodeError("metadata_too_deep", f"metadata nests {depth} levels > limit {max_depth}")
    size = len(orjson.dumps(metadata))
    if size > max_bytes:
        raise DecodeError("metadata_too_large", f"metadata is {size} bytes > limit {max_bytes}")


def decode_event(
    raw: bytes | None, *, max_bytes: int = MAX_EVENT_BYTES, max_metadata_depth: int = MAX_METADATA_DEPTH,
    max_metadata_bytes: int = MAX_METADATA_BYTES,
) -> ConversationEvent:
    """Bytes from Kafka → a validated event, or DecodeError naming exactly what is wrong.

    An event that decodes can be serialised again inside every output (verdict, review request, alert): the
    metadata limits are what guarantee it.
    """
    obj = _json_object(raw, max_bytes)
    _check_metadata(obj, max_metadata_depth, max_metadata_bytes)
    try:
        return ConversationEvent.model_validate(obj)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any("empty conversation" in str(e.get("msg", "")) for e in errors) or (
            isinstance(obj.get("messages"), list) and not obj["messages"]
        ):
            raise DecodeError("empty_conversation", "the conversation has no non-empty message") from exc
        raise DecodeError("schema_violation", _summary(errors)) from exc


def decode_chunk(raw: bytes | None, *, max_bytes: int = MAX_EVENT_BYTES, max_metadata_depth: int = MAX_METADATA_DEPTH,
                 max_metadata_bytes: int = MAX_METADATA_BYTES) -> ResponseChunk:
    """Bytes from the ``responses`` topic → a validated response chunk, or DecodeError with the reason.

    The same metadata limits as events: a chunk's metadata travels into its verdict, which must serialise.
    """
    obj = _json_object(raw, max_bytes)
    _check_metadata(obj, max_metadata_depth, max_metadata_bytes)
    try:
        return ResponseChunk.model_validate(obj)
    except ValidationError as exc:
        raise DecodeError("schema_violation", _summary(exc.errors(include_url=False, include_input=False))) from exc


class InvalidVerdict(Exception):
    """A correctly signed verdict record whose body is not a ``Verdict``."""


def decode_verdict(record: Record, signer: Signer, *, roles: Collection[Role] = ROLES, now: float | None = None,
                   max_age_s: float | None = None) -> Verdict:
    """A record of the verdicts topic → its ``Verdict``, only if a role in ``roles`` that may write it signed it.

    Raises ``worker.signing.SignatureError`` (a verdict its writer's key did not sign: a forged "the expert said
    safe", an expert verdict signed with a worker key, a replay of an old one) and ``InvalidVerdict`` for a signed
    body that does not parse. The signature is checked before the body is read; the body's ``source`` must then be
    one the signing role writes (``VERDICT_WRITER``).
    """
    signed = signer.verify_record("verdict", record, roles=roles, now=now, max_age_s=max_age_s)
    try:
        verdict = Verdict.model_validate(orjson.loads(record.value or b""))
    except (orjson.JSONDecodeError, ValidationError) as exc:
        raise InvalidVerdict(str(exc)) from exc
    if signed is not None and VERDICT_WRITER[verdict.source] != signed.role:
        raise signer.refuse("verdict", "wrong_role", signed.role,
                            f"a {signed.role} key signed a verdict of source {verdict.source!r}")
    return verdict


def _summary(errors: Sequence[Any]) -> str:
    """The first validation errors as ``field.path: message``, one line for the dead letter."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5])


def _json_object(raw: bytes | None, max_bytes: int) -> dict[str, Any]:
    """Bytes → a JSON object, or DecodeError: tombstone, oversize, bad UTF-8, bad JSON, not an object."""
    if raw is None:
        raise DecodeError("schema_violation", "null message value (tombstone)")
    if len(raw) > max_bytes:
        raise DecodeError("oversize", f"{len(raw)} bytes > limit {max_bytes}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError("undecodable_utf8", str(exc)) from exc
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("invalid_json", str(exc)) from exc
    if not isinstance(obj, dict):
        raise DecodeError("schema_violation", "top level must be a JSON object")
    return obj
