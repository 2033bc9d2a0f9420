"""Stage 1 of an event: Kafka bytes → a validated ``ConversationEvent``, or the one reason it is bad.

Input limits are enforced while decoding, and every way an input can be bad maps to one ``DecodeError``
reason, so it can be dead-lettered with it.

Whatever decodes must also serialise again: metadata is bounded in depth and size (``worker.max_metadata_*``;
pydantic and orjson refuse to serialise deep nesting, so an unbounded event would decode and then fail inside
its verdict, in the middle of a batch).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeAlias, TypeVar

import orjson
from pydantic import ValidationError

from worker.events import (
    MAX_EVENT_BYTES,
    MAX_MESSAGES,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    ConversationEvent,
    EventView,
    ResponseChunk,
    Verdict,
)
from worker.signing import ROLES, VERDICT_WRITER, Role, Signer

if TYPE_CHECKING:
    from aiokafka import ConsumerRecord

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"
P = ParamSpec("P")
R = TypeVar("R")

DecodeReason = Literal[
    "undecodable_utf8", "invalid_json", "schema_violation", "oversize", "empty_conversation",
    "metadata_too_deep", "metadata_too_large", "undecodable",
]


class DecodeError(Exception):
    def __init__(self, reason: DecodeReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: DecodeReason = reason
        self.detail = detail


def _one_record(decode: Callable[P, R]) -> Callable[P, R]:
    """``decode``, with whatever else a record's bytes make it raise (an error type a library lets through, as
    ``astimezone``'s OverflowError did) as that record's DecodeError ("undecodable"), never an exception out of
    the consumer's accept: one crafted event must not stop its partition. A wrapper, not a ``with`` block: on the
    monitor's path per event, a contextmanager costs ~2.4 µs here, a wrapper ~0.2."""
    @functools.wraps(decode)
    def decoded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return decode(*args, **kwargs)
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError("undecodable", f"{type(exc).__name__}: {exc}"[:500]) from exc

    return decoded


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``{}`` is 1), without recursion."""
    if isinstance(value, dict) and not any(isinstance(v, (dict, list)) for v in value.values()):
        return 1  # flat metadata, the usual kind: a third of the walk's cost
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


@_one_record
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
    return _validate_event(obj)


def _validate_event(obj: dict[str, Any]) -> ConversationEvent:
    try:
        return ConversationEvent.model_validate(obj)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any("empty conversation" in str(e.get("msg", "")) for e in errors) or (
            isinstance(obj.get("messages"), list) and not obj["messages"]
        ):
            raise DecodeError("empty_conversation", "the conversation has no non-empty message") from exc
        raise DecodeError("schema_violation", _summary(errors)) from exc


@dataclass(frozen=True)
class ViewLimits:
    """Past ``max_messages`` messages or ``max_bytes`` of content an event is scored on a bounded view: its first
    ``head`` and last ``tail`` messages, each cut to ``message_bytes``, ``max_bytes`` of content in all."""

    max_messages: int = MAX_MESSAGES
    max_bytes: int = MAX_EVENT_BYTES
    head: int = 16
    tail: int = 240
    message_bytes: int = 65_536

    def __post_init__(self) -> None:
        if self.head + self.tail > MAX_MESSAGES or self.max_messages > MAX_MESSAGES:
            raise ValueError(f"a bounded view keeps at most {MAX_MESSAGES} messages")
        if self.message_bytes > self.max_bytes:
            raise ValueError("view message_bytes cannot exceed the view's max_bytes")


@dataclass(frozen=True)
class Viewed:
    """A decoded event and, when it was past the limits, what of it was kept (``event`` is then the view)."""

    event: ConversationEvent
    view: EventView | None


# Between the first and last halves of a message cut for a bounded view.
_CUT = "\n[...]\n"


def _cap(content: str, limit: int) -> tuple[str, bool]:
    """``content`` as at most about ``limit`` UTF-8 bytes: its first and last halves (whole characters)."""
    raw = content.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return content, False
    half = limit // 2
    head = raw[:half].decode("utf-8", "ignore")
    tail = raw[len(raw) - half:].decode("utf-8", "ignore")
    return head + _CUT + tail, True


def _content_chars(message: Any) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    return len(content) if isinstance(content, str) else 0


def _content_bytes(message: Any) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    return len(content.encode("utf-8", "surrogatepass")) if isinstance(content, str) else 0


def _bounded_view(obj: dict[str, Any], limits: ViewLimits) -> EventView | None:
    """Replace ``obj["messages"]`` by its bounded view when the event is past the limits; what was kept, or None.

    Priority under the byte budget: the last message (what the conversation is about now), then the head (the
    system prompt and the opening request), then the tail newest first. Messages that are not kept are not read:
    only what is scored must be well formed.
    """
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        return None  # the schema check names it
    n = len(messages)
    if n <= limits.max_messages and 4 * sum(_content_chars(m) for m in messages) <= min(limits.max_bytes,
                                                                                      MAX_EVENT_BYTES):
        return None  # a character is at most 4 UTF-8 bytes: surely within every limit, without encoding
    sizes = [_content_bytes(m) for m in messages]
    total = sum(sizes)
    if n <= limits.max_messages and total <= limits.max_bytes and max(sizes) <= MAX_EVENT_BYTES:
        return None  # within every limit: scored whole, exactly as before
    head = list(range(min(limits.head, n)))
    tail = list(range(max(len(head), n - limits.tail), n))
    order = [n - 1, *(i for i in head if i != n - 1), *(i for i in reversed(tail) if i != n - 1)]
    kept: dict[int, Any] = {}
    budget = limits.max_bytes
    capped = 0
    for i in order:
        message = messages[i]
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            content, cut = _cap(message["content"], limits.message_bytes)
            size = len(content.encode("utf-8", "surrogatepass"))
            if kept and size > budget:
                break
            message = {**message, "content": content}
            capped += cut
            budget -= size
        kept[i] = message
    indices = sorted(kept)
    obj["messages"] = [kept[i] for i in indices]
    return EventView(messages=n, content_bytes=total, head=sum(1 for i in indices if i in head),
                     tail=sum(1 for i in indices if i not in head), capped=capped,
                     kept_bytes=limits.max_bytes - budget)


@_one_record
def decode_viewed(
    raw: bytes | None, *, view: ViewLimits, max_bytes: int = MAX_EVENT_BYTES,
    max_metadata_depth: int = MAX_METADATA_DEPTH, max_metadata_bytes: int = MAX_METADATA_BYTES,
) -> Viewed:
    """``decode_event`` for the monitor: an event past the message or content limits is scored on its bounded view
    (``view``) and says so, instead of being dead-lettered. ``max_bytes`` stays the hard transport limit."""
    obj = _json_object(raw, max_bytes)
    _check_metadata(obj, max_metadata_depth, max_metadata_bytes)
    kept = _bounded_view(obj, view)
    return Viewed(_validate_event(obj), kept)


@_one_record
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
    except Exception as exc:
        raise InvalidVerdict(f"{type(exc).__name__}: {exc}") from exc
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
        obj = orjson.loads(raw)  # refuses invalid UTF-8 too: the bytes are decoded again only to say which it was
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise DecodeError("undecodable_utf8", str(bad)) from bad
        raise DecodeError("invalid_json", str(exc)) from exc
    if not isinstance(obj, dict):
        raise DecodeError("schema_violation", "top level must be a JSON object")
    return obj
