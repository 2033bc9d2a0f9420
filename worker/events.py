"""The event contract: conversation events in, verdicts / review requests / dead letters out.

Every model is versioned (``schema_version``) and serialised with orjson; worker/decode.py turns input bytes
into these models.
"""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from probes.conversation import Conversation, Message

SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 1_000_000
MAX_MESSAGES = 512
MAX_ID_CHARS = 256


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_EVENT_BYTES)


class ConversationEvent(_Model):
    """One conversation so far; ``event_id`` is the idempotency key, ``conversation_id`` the Kafka key."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="ConversationEvent")

    schema_version: Literal[1] = 1
    event_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    conversation_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    tenant: str = Field("default", min_length=1, max_length=MAX_ID_CHARS)
    created_at: dt.datetime
    messages: list[ChatMessage] = Field(max_length=MAX_MESSAGES)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value or not any(m.content.strip() for m in value):
            raise ValueError("empty conversation")
        return value

    def conversation(self) -> Conversation:
        return tuple(Message(m.role, m.content) for m in self.messages)


class BudgetState(_Model):
    """What the delegation rule looked like when this verdict was made."""

    alpha: float | None = None
    threshold: float | None = None
    offline_threshold: float | None = None
    window_threshold: float | None = None
    window_rate: float | None = None
    cap_binding: bool = False
    valid: bool = True


class Timings(_Model):
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0


class Verdict(_Model):
    """The monitor's decision on one event; the newest verdict for an ``event_id`` supersedes older ones."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="Verdict")

    schema_version: Literal[1] = 1
    event_id: str
    conversation_id: str
    tenant: str
    p_unsafe: float = Field(ge=0.0, le=1.0)
    dv: float | None = None
    delegated: bool
    decision: Literal["unsafe", "safe"]
    source: Literal["probe", "expert"]
    budget: BudgetState
    bundle_version: str
    model_version: str
    expert_version: str | None = None
    timings: Timings
    decided_at: dt.datetime
    metadata: dict[str, Any] = Field(default_factory=dict)


class ReviewRequest(_Model):
    """A delegated event for the guard service, with the probe's view of it."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="ReviewRequest")

    schema_version: Literal[1] = 1
    event: ConversationEvent
    p_unsafe: float
    dv: float | None
    reason: str
    threshold: float | None
    budget: BudgetState | None = None  # the delegation's rule state, copied into the expert verdict unchanged
    bundle_version: str
    model_version: str | None = None
    requested_at: dt.datetime


class Alert(_Model):
    """A harmful final verdict worth a human's attention; ``alert_id`` is stable per event (dedupe key)."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="Alert")

    schema_version: Literal[1] = 1
    alert_id: str
    event_id: str
    conversation_id: str
    tenant: str
    severity: Literal["warning", "critical"]
    source: Literal["probe", "expert"]
    p_unsafe: float
    bundle_version: str
    expert_version: str | None = None
    verdict_decided_at: dt.datetime
    raised_at: dt.datetime
    metadata: dict[str, Any] = Field(default_factory=dict)


class DeadLetter(_Model):
    """An input the stream could not process: the original bytes, why, and where it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="DeadLetter")

    schema_version: Literal[1] = 1
    reason: str
    error: str
    topic: str
    partition: int
    offset: int
    key_b64: str | None
    value_b64: str
    stage: Literal["decode", "inference", "expert"]
    failed_at: dt.datetime


def dead_letter(
    *, reason: str, error: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
    stage: Literal["decode", "inference", "expert"],
) -> DeadLetter:
    return DeadLetter(
        reason=reason, error=error[:2000], topic=topic, partition=partition, offset=offset,
        key_b64=None if key is None else base64.b64encode(key).decode(),
        value_b64=base64.b64encode(value or b"").decode(), stage=stage, failed_at=utcnow(),
    )


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ResponseChunk(_Model):
    """New text of one streamed response (topic ``responses``, Kafka key = ``response_id``).

    Chunks are numbered by ``seq`` from 0; chunk 0 carries ``context``, the conversation before the response (the
    prefix the token probe reads first; an empty list when there is none). ``final`` marks the last chunk.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", title="ResponseChunk")

    schema_version: Literal[1] = 1
    response_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    seq: int = Field(ge=0)
    text: str = Field("", max_length=MAX_EVENT_BYTES)
    final: bool = False
    tenant: str = Field("default", min_length=1, max_length=MAX_ID_CHARS)
    conversation_id: str | None = Field(None, max_length=MAX_ID_CHARS)
    context: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES)
    created_at: dt.datetime
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _context_on_first_chunk(self) -> ResponseChunk:
        if (self.seq == 0) != (self.context is not None):
            raise ValueError("chunk 0, and only chunk 0, carries the context")
        return self

    def conversation(self) -> Conversation:
        return tuple(Message(m.role, m.content) for m in self.context or ())


class StreamVerdict(_Model):
    """The one terminal verdict of a streamed response: stopped at ``token_index``, or judged at its end."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="StreamVerdict")

    schema_version: Literal[1] = 1
    response_id: str
    conversation_id: str | None
    tenant: str
    decision: Literal["stop", "allow"]
    reason: Literal["threshold", "final", "timeout", "gap"]
    token_index: int | None = Field(None, description="response token at which the smoothed score crossed")
    tokens_scored: int
    last_seq: int
    p_unsafe: float = Field(ge=0.0, le=1.0)
    threshold: float | None
    aggregator: str
    alpha: float | None
    bundle_version: str
    model_version: str
    decided_at: dt.datetime
    metadata: dict[str, Any] = Field(default_factory=dict)


SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "conversation_event": ConversationEvent,
    "verdict": Verdict,
    "review_request": ReviewRequest,
    "dead_letter": DeadLetter,
    "alert": Alert,
    "response_chunk": ResponseChunk,
    "stream_verdict": StreamVerdict,
}


def json_schemas() -> dict[str, bytes]:
    """The checked-in JSON Schema files, generated from the models (tests compare them byte for byte)."""
    return {
        f"{name}.schema.json": orjson.dumps(model.model_json_schema(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        + b"\n"
        for name, model in SCHEMA_MODELS.items()
    }
