"""Stage 1 of an event: Kafka bytes → a validated ``ConversationEvent``, or the one reason it is bad.

Input limits are enforced while decoding, and every way an input can be bad maps to one ``DecodeError``
reason, so it can be dead-lettered with it.
"""

from __future__ import annotations

from typing import Literal

import orjson
from pydantic import ValidationError

from worker.events import MAX_EVENT_BYTES, ConversationEvent

DecodeReason = Literal["undecodable_utf8", "invalid_json", "schema_violation", "oversize", "empty_conversation"]


class DecodeError(Exception):
    def __init__(self, reason: DecodeReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: DecodeReason = reason
        self.detail = detail


def decode_event(raw: bytes | None, *, max_bytes: int = MAX_EVENT_BYTES) -> ConversationEvent:
    """Bytes from Kafka → a validated event, or DecodeError naming exactly what is wrong."""
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
    try:
        return ConversationEvent.model_validate(obj)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any("empty conversation" in str(e.get("msg", "")) for e in errors) or (
            isinstance(obj.get("messages"), list) and not obj["messages"]
        ):
            raise DecodeError("empty_conversation", "the conversation has no non-empty message") from exc
        summary = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5])
        raise DecodeError("schema_violation", summary) from exc
