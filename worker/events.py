"""The event contract: conversation events in, verdicts / review requests / dead letters out.

Every model is versioned (``schema_version``) and serialised to JSON by pydantic-core; worker/decode.py turns input bytes
into these models.

Every timestamp is timezone-aware UTC: a naive ``created_at``/``requested_at`` is read as UTC, never compared
as local time (an aware minus a naive datetime raises, in the middle of a batch).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from probes.conversation import Conversation, Message

SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 1_000_000
MAX_MESSAGES = 512
MAX_ID_CHARS = 256
MAX_METADATA_DEPTH = 16
MAX_METADATA_BYTES = 16_384
# A truncated dead letter keeps at most this much of the original key (the value gets the rest of the room).
_DEAD_LETTER_KEY_PREFIX = 256
#: The Kafka header on the guard's audit verdicts: readers that want only those skip the rest unparsed.
AUDIT_HEADER = "audit"


def _as_utc(value: dt.datetime) -> dt.datetime:
    # Producers in the wild send "2026-11-30T12:00:00" without an offset; read it as UTC rather than fail later
    # when it is subtracted from an aware clock reading.
    if value.tzinfo is None or value.utcoffset() is None:
        return value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError as exc:
        # "0001-01-01T00:00:00+01:00" is before year 1 in UTC. pydantic turns only a ValueError from a validator
        # into a ValidationError: an OverflowError went out of the consumer's accept and stopped the partition.
        raise ValueError("the timestamp is out of range in UTC") from exc


UtcDatetime = Annotated[dt.datetime, AfterValidator(_as_utc)]

_PROBE_FEATURES_DOC = (
    "audits under audit.refit=head: the pooled activations the probe's safety head scored for this event (the row "
    "p_unsafe came from), float32 values, so the workers can refit the head on the audited window")


def float32_list(values: npt.ArrayLike) -> list[float]:
    """A float32 vector as the shortest decimals that read back as the same float32 (``probe_features``): about
    half the JSON of float64 reprs (576 values ≈ 6 KB), and nothing the head reads is lost."""
    return [float(v) for v in np.asarray(values, dtype=np.float32).reshape(-1).astype(str)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    #: Fields added to a schema after its first release (``schema_version`` stays 1: the change is additive).
    #: They are left out of the JSON while at their default, so a reader from before them (``extra="forbid"``)
    #: still reads everything a deployment that does not use them writes.
    added_fields: ClassVar[frozenset[str]] = frozenset()

    def to_json(self) -> bytes:
        # pydantic-core's own serializer: the same bytes as orjson over ``model_dump(mode="json")`` (floats,
        # escapes and datetimes alike; tests/worker/test_events.py), without the intermediate dict of Python
        # objects, which cost a verdict about as much again.
        unset = {name for name, default in _added_defaults(type(self)) if getattr(self, name) == default}
        return self.model_dump_json(exclude=unset or None).encode()


@functools.cache
def _added_defaults(cls: type[_Model]) -> tuple[tuple[str, Any], ...]:
    """``cls.added_fields`` with their defaults, read once per class: every read of ``model_fields`` goes through
    pydantic's deprecation descriptor, and six of them per verdict cost about as much as the dump itself."""
    return tuple((name, cls.model_fields[name].default) for name in sorted(cls.added_fields))


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
    created_at: UtcDatetime
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


class Recalibration(_Model):
    """The online recalibration in force when a probe verdict was decided (``audit.rate`` > 0; worker/recalibration.py).

    ``source="offline"``: the bundle's cut decided (too few audits yet, or the window certified no cut);
    ``"window"``: the cut re-certified on the window of audited expert verdicts. ``cut`` is on the verdict's
    (calibrated) ``p_unsafe``, ``probe_cut`` the same decision on the raw probe score (None under a refit head:
    no cut on the bundle's score makes the refit head's decisions).
    """

    version: int = Field(description="the same on every replica fed the same audits; 0 before the first refit")
    source: Literal["offline", "window"]
    refit: Literal["platt", "head"] = Field("platt", description="what the window refits: a Platt map or the head")
    cut: float
    probe_cut: float | None
    valid: bool = Field(description="the cut in force is certified")
    window: int = Field(ge=0, description="audited verdicts in the window")
    window_benign: int = Field(ge=0, description="of which the expert called benign (what the cut certifies on)")


class EventView(_Model):
    """How much of an event past the size limits was scored (``worker.view_*``): its first and last messages,
    each cut to at most ``worker.view_message_bytes`` (its first and last halves kept). Such an event still gets a
    verdict; only input that cannot be decoded is dead-lettered."""

    kind: Literal["bounded"] = "bounded"
    messages: int = Field(ge=0, description="messages in the event")
    content_bytes: int = Field(ge=0, description="UTF-8 bytes of the event's message content")
    head: int = Field(ge=0, description="first messages kept")
    tail: int = Field(ge=0, description="last messages kept")
    capped: int = Field(ge=0, description="kept messages cut to their first and last bytes")
    kept_bytes: int = Field(ge=0, description="UTF-8 bytes of the content scored")


class Timings(_Model):
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0


class Verdict(_Model):
    """The monitor's decision on one event; the newest verdict for an ``event_id`` supersedes older ones, except
    an audit verdict (``audit`` and not ``delegated``, ``source`` not "probe"): the expert's label of an audited
    event, which the online recalibration learns from; the probe's verdict on that event stays final."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="Verdict")
    added_fields: ClassVar[frozenset[str]] = frozenset({"audit", "probe_p_unsafe", "recalibration",
                                                        "probe_features", "view", "claimed_tenant"})

    schema_version: Literal[1] = 1
    event_id: str
    conversation_id: str
    tenant: str
    p_unsafe: float = Field(ge=0.0, le=1.0)
    dv: float | None = None
    delegated: bool
    decision: Literal["unsafe", "safe"]
    # "expert_unavailable": delegated, but the expert failed for good (guard.unavailable_decision decides).
    source: Literal["probe", "expert", "expert_unavailable"]
    budget: BudgetState
    bundle_version: str
    model_version: str
    expert_version: str | None = None
    timings: Timings
    decided_at: UtcDatetime
    metadata: dict[str, Any] = Field(default_factory=dict)
    audit: bool = Field(False, description="the event is in the audit sample (audit.rate): the guard labels it")
    probe_p_unsafe: float | None = Field(
        None, ge=0.0, le=1.0, description="the probe's raw score where p_unsafe is another: the expert's (audit verdicts) or the "
        "recalibrated score (probe verdicts under online recalibration)")
    recalibration: Recalibration | None = Field(
        None, description="probe verdicts while audits are on: the recalibration state that decided")
    probe_features: list[float] | None = Field(None, description=f"audit verdicts: the request's; {_PROBE_FEATURES_DOC}")
    view: EventView | None = Field(None, description="set when the event was past the size limits: what was scored")
    claimed_tenant: str | None = Field(
        None, description="the tenant the event's payload claimed, where it is not ``tenant`` (tenant.source): "
        "recorded, never used for isolation")


class ReviewRequest(_Model):
    """An event for the guard service, with the probe's view of it: delegated (the expert's verdict is final),
    audited (a label for the online recalibration; the probe's verdict stays final), or both."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="ReviewRequest")
    added_fields: ClassVar[frozenset[str]] = frozenset({"delegated", "audit", "probe_features", "view",
                                                        "probe_decision"})

    schema_version: Literal[1] = 1
    event: ConversationEvent
    p_unsafe: float = Field(description="the probe's raw score (before any online recalibration)")
    dv: float | None
    reason: str
    threshold: float | None
    budget: BudgetState | None = None  # the delegation's rule state, copied into the expert verdict unchanged
    bundle_version: str
    model_version: str | None = None
    requested_at: UtcDatetime
    delegated: bool = Field(True, description="the delegation rule sent it: the expert's verdict is final")
    audit: bool = Field(False, description="in the audit sample: the expert's verdict labels it for recalibration")
    probe_features: list[float] | None = Field(None, description=_PROBE_FEATURES_DOC)
    view: EventView | None = Field(None, description="``event`` is the bounded view of a longer event (see Verdict)")
    probe_decision: Literal["unsafe", "safe"] | None = Field(
        None, description="the probe verdict's decision, at the cut in force when the worker decided (online "
        "recalibration included): what guard.unavailable_decision=probe answers")

    @model_validator(mode="after")
    def _has_a_reason(self) -> ReviewRequest:
        if not (self.delegated or self.audit):
            raise ValueError("a review request is delegated, audited or both")
        return self


class Alert(_Model):
    """A harmful final verdict worth a human's attention; ``alert_id`` is stable per event (dedupe key)."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="Alert")

    schema_version: Literal[1] = 1
    alert_id: str
    event_id: str
    conversation_id: str
    tenant: str
    severity: Literal["warning", "critical"]
    # "stream": a streamed response stopped unscored (timeout, gap, limit, error: worker/responses.py).
    source: Literal["probe", "expert", "expert_unavailable", "stream"]
    p_unsafe: float
    bundle_version: str
    expert_version: str | None = None
    verdict_decided_at: UtcDatetime
    raised_at: UtcDatetime
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
    stage: Literal["decode", "inference", "expert", "publish"]
    failed_at: UtcDatetime
    value_bytes: int | None = Field(None, description="length of the original value")
    value_sha256: str | None = Field(None, description="sha256 of the original value (hex)")
    key_bytes: int | None = Field(None, description="length of the original key")
    truncated: bool = Field(False, description="key_b64/value_b64 hold only a prefix of the original bytes")


def dead_letter(
    *, reason: str, error: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
    stage: Literal["decode", "inference", "expert", "publish"], max_bytes: int = MAX_EVENT_BYTES,
) -> DeadLetter:
    """The dead letter for one input; its JSON is at most ``max_bytes`` long.

    Base64 grows the original by a third, so the dead letter of a record near the topic's size limit would
    itself be refused by the broker, and its offset could never be committed. Past ``max_bytes`` the letter keeps
    a prefix of the key and of the value, their original lengths and the value's sha256, and says so
    (``truncated``): enough to find, count and deduplicate the original, and it can always be written.
    """
    raw = value or b""
    full = DeadLetter(
        reason=reason, error=error[:2000], topic=topic, partition=partition, offset=offset,
        key_b64=None if key is None else base64.b64encode(key).decode(),
        value_b64=base64.b64encode(raw).decode(), stage=stage, failed_at=utcnow(),
        value_bytes=len(raw), value_sha256=hashlib.sha256(raw).hexdigest(),
        key_bytes=None if key is None else len(key),
    )
    if len(full.to_json()) <= max_bytes:
        return full
    short_key = None if key is None else base64.b64encode(key[:_DEAD_LETTER_KEY_PREFIX]).decode()
    empty = full.model_copy(update={"key_b64": short_key, "value_b64": "", "truncated": True, "error": error[:200]})
    room = max_bytes - len(empty.to_json())
    if room < 0:
        raise ValueError(f"max_bytes={max_bytes} is too small for a dead letter without its value")
    # 4 base64 characters carry 3 bytes; whole groups keep the prefix decodable.
    prefix = raw[: (room // 4) * 3]
    return empty.model_copy(update={"value_b64": base64.b64encode(prefix).decode()})


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
    # Only a response read to its final chunk can be allowed: a timeout, a gap, a limit or an inference error
    # stops it (fail closed) and raises an alert.
    decision: Literal["stop", "allow"]
    reason: Literal["threshold", "final", "timeout", "gap", "limit", "error"]
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
