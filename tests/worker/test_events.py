from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import get_args

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.decode import DecodeError, DecodeReason, decode_event
from worker.events import (
    Alert,
    BudgetState,
    ConversationEvent,
    ReviewRequest,
    Timings,
    Verdict,
    dead_letter,
    json_schemas,
    utcnow,
)

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "worker" / "schemas"


def _event(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "event_id": "e1", "conversation_id": "c1", "tenant": "t", "created_at": "2026-11-23T00:00:00Z",
        "messages": [{"role": "user", "content": "hello"}], "metadata": {"label": 1},
    }
    base.update(over)
    return base


def test_roundtrip() -> None:
    event = decode_event(orjson.dumps(_event()))
    assert event.event_id == "e1" and event.conversation()[0].content == "hello"
    assert decode_event(event.to_json()) == event


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"\xff\xfe\x00bad", "undecodable_utf8"),
        (b"{not json", "invalid_json"),
        (b"[1,2]", "schema_violation"),
        (orjson.dumps(_event(messages=[])), "empty_conversation"),
        (orjson.dumps(_event(messages=[{"role": "user", "content": "   "}])), "empty_conversation"),
        (orjson.dumps(_event(messages=[{"role": "robot", "content": "x"}])), "schema_violation"),
        (orjson.dumps(_event(event_id="")), "schema_violation"),
        (orjson.dumps({k: v for k, v in _event().items() if k != "created_at"}), "schema_violation"),
        (orjson.dumps(_event(extra_field=1)), "schema_violation"),
        (orjson.dumps(_event(messages=[{"role": "user", "content": "x" * 5000}])), "oversize"),
        # Valid ISO 8601, but before year 1 / after 9999 once in UTC: astimezone raised OverflowError, which
        # pydantic lets through, and it stopped the monitor's partition on every restart.
        (orjson.dumps(_event(created_at="0001-01-01T00:00:00+01:00")), "schema_violation"),
        (orjson.dumps(_event(created_at="9999-12-31T23:59:59-01:00")), "schema_violation"),
    ],
)
def test_bad_inputs_have_reasons(raw: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_event(raw, max_bytes=4096)
    assert info.value.reason == reason


def test_whatever_else_a_record_makes_the_decoder_raise_is_its_decode_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A library error type nobody expected (as astimezone's OverflowError was) is still one record's dead letter."""
    def explode(obj: object) -> object:
        raise OverflowError("something a library lets through")

    monkeypatch.setattr(ConversationEvent, "model_validate", explode)
    with pytest.raises(DecodeError) as info:
        decode_event(orjson.dumps(_event()))
    assert info.value.reason == "undecodable" and "OverflowError" in info.value.detail


def test_tombstone() -> None:
    with pytest.raises(DecodeError, match="tombstone"):
        decode_event(None)


def test_dead_letter_keeps_original_bytes() -> None:
    raw = b"\xff\x00 anything"
    record = dead_letter(reason="undecodable_utf8", error="x", topic="in", partition=2, offset=7, key=b"k",
                         value=raw, stage="decode")
    parsed = orjson.loads(record.to_json())
    assert base64.b64decode(parsed["value_b64"]) == raw and parsed["offset"] == 7 and parsed["partition"] == 2


def test_checked_in_schemas_match_the_models() -> None:
    for name, content in json_schemas().items():
        path = SCHEMA_DIR / name
        assert path.is_file(), f"missing {path}: run `ctd-monitor schemas --write`"
        assert path.read_bytes() == content, f"{name} is stale: run `ctd-monitor schemas --write`"


text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=50)


@given(
    event_id=text, conversation_id=text,
    messages=st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), text), min_size=1, max_size=5),
    metadata=st.dictionaries(st.text(max_size=10), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10) | st.booleans(), max_size=4),
)
def test_codec_roundtrip_property(event_id: str, conversation_id: str, messages: list[tuple[str, str]],
                                  metadata: dict[str, object]) -> None:
    if not any(c.strip() for _, c in messages):
        return
    event = ConversationEvent.model_validate(_event(
        event_id=event_id, conversation_id=conversation_id, metadata=metadata,
        messages=[{"role": r, "content": c} for r, c in messages],
    ))
    assert decode_event(event.to_json()) == event


@given(st.binary(max_size=300))
def test_decoder_fuzz_never_raises_anything_but_decode_error(raw: bytes) -> None:
    try:
        decode_event(raw)
    except DecodeError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@st.composite
def mutated_events(draw: st.DrawFn) -> bytes:
    """A valid event with fields dropped, replaced by arbitrary JSON, or added: the validator's deep paths."""
    obj: dict[str, object] = dict(_event())
    if draw(st.booleans()):  # any offset on any date, year 1 and 9999 included
        offset = dt.timezone(dt.timedelta(minutes=draw(st.integers(-1439, 1439))))
        obj["created_at"] = draw(st.datetimes()).replace(tzinfo=offset).isoformat()
    for name in draw(st.lists(st.sampled_from([*obj, "schema_version", "extra"]), max_size=3)):
        if draw(st.booleans()):
            obj.pop(name, None)
        else:
            obj[name] = draw(json_values)
    return orjson.dumps(obj)


raw_records = st.one_of(
    st.none(), st.binary(max_size=300), st.text(max_size=300).map(str.encode), json_values.map(orjson.dumps),
    mutated_events(), st.just(orjson.dumps(_event())),
)


@given(st.lists(raw_records, max_size=25))
def test_decoding_fuzzed_traffic_accounts_for_every_record(raws: list[bytes | None]) -> None:
    """Each record yields exactly one outcome: an event that re-encodes to itself, or a dead letter that
    names a known reason and keeps the original bytes. Nothing else may escape the decoder."""
    outcomes = 0
    for offset, raw in enumerate(raws):
        try:
            event = decode_event(raw, max_bytes=4096)
        except DecodeError as exc:
            assert exc.reason in get_args(DecodeReason)
            record = orjson.loads(dead_letter(reason=exc.reason, error=exc.detail, topic="in", partition=0,
                                              offset=offset, key=None, value=raw, stage="decode").to_json())
            assert base64.b64decode(record["value_b64"]) == (raw or b"") and record["offset"] == offset
        else:
            assert decode_event(event.to_json()) == event
        outcomes += 1
    assert outcomes == len(raws)


# --- hostile inputs that decode must also serialise (issue 14) -------------------------------------------------


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def test_deep_metadata_is_dead_lettered_at_decode() -> None:
    """The issue's record: a schema-valid 1.5 kB event whose metadata nests a few hundred levels. It used to
    decode, then `Verdict.to_json()` raised inside the batch and blinded the partition."""
    deep = b'{"a":' * 300 + b"1" + b"}" * 300  # deeper than orjson itself would write
    raw = orjson.dumps(_event(metadata={"x": "DEEP"})).replace(b'"DEEP"', deep)
    assert 1000 < len(raw) < 4096
    with pytest.raises(DecodeError) as info:
        decode_event(raw)
    assert info.value.reason == "metadata_too_deep" and "limit 16" in info.value.detail


def test_deep_metadata_of_a_response_chunk_is_refused_at_decode_too() -> None:
    """Streamed chunks carry metadata into their verdicts as well: the same limits hold there."""
    from worker.decode import decode_chunk

    chunk = {"response_id": "r", "seq": 0, "text": "hi", "final": True, "created_at": "2026-01-01T00:00:00Z",
             "context": [{"role": "user", "content": "q"}], "metadata": {"x": "DEEP"}}
    decode_chunk(orjson.dumps({**chunk, "metadata": {"x": 1}}))
    raw = orjson.dumps(chunk).replace(b'"DEEP"', b'{"a":' * 300 + b"1" + b"}" * 300)
    with pytest.raises(DecodeError) as info:
        decode_chunk(raw)
    assert info.value.reason == "metadata_too_deep"


def test_metadata_limits_are_settings() -> None:
    at_limit = orjson.dumps(_event(metadata=_nested(16)))
    decode_event(at_limit)  # depth 16 (the metadata object itself counts) is allowed
    with pytest.raises(DecodeError, match="metadata_too_deep"):
        decode_event(orjson.dumps(_event(metadata=_nested(17))))
    with pytest.raises(DecodeError, match="metadata_too_deep"):
        decode_event(at_limit, max_metadata_depth=4)
    big = orjson.dumps(_event(metadata={"blob": "x" * 20_000}))
    with pytest.raises(DecodeError) as info:
        decode_event(big)
    assert info.value.reason == "metadata_too_large"
    assert decode_event(big, max_metadata_bytes=30_000).metadata["blob"] == "x" * 20_000


def test_naive_timestamps_are_read_as_utc() -> None:
    event = decode_event(orjson.dumps(_event(created_at="2026-11-23T10:00:00")))
    assert event.created_at == dt.datetime(2026, 11, 23, 10, tzinfo=dt.UTC)
    shifted = decode_event(orjson.dumps(_event(created_at="2026-11-23T12:00:00+02:00")))
    assert shifted.created_at == event.created_at and shifted.created_at.utcoffset() == dt.timedelta(0)
    assert (utcnow() - event.created_at).total_seconds() > 0  # aware arithmetic: used to raise TypeError
    request = ReviewRequest(event=event, p_unsafe=0.5, dv=None, reason="r", threshold=None, bundle_version="b",
                            requested_at=dt.datetime(2026, 11, 23, 10))
    assert request.requested_at.tzinfo is not None
    assert ReviewRequest.model_validate_json(request.to_json()).requested_at == request.requested_at


def _outputs(event: ConversationEvent) -> list[bytes]:
    """Every record the monitor writes about a decoded event, serialised."""
    verdict = Verdict(
        event_id=event.event_id, conversation_id=event.conversation_id, tenant=event.tenant, p_unsafe=0.5, dv=0.1,
        delegated=True, decision="unsafe", source="probe", budget=BudgetState(), bundle_version="b",
        model_version="m", timings=Timings(), decided_at=utcnow(), metadata=event.metadata,
    )
    review = ReviewRequest(event=event, p_unsafe=0.5, dv=0.1, reason="r", threshold=0.2, bundle_version="b",
                           requested_at=utcnow())
    alert = Alert(alert_id="a", event_id=event.event_id, conversation_id=event.conversation_id, tenant=event.tenant,
                  severity="warning", source="probe", p_unsafe=0.5, bundle_version="b",
                  verdict_decided_at=verdict.decided_at, raised_at=utcnow(), metadata=event.metadata)
    return [verdict.to_json(), review.to_json(), alert.to_json()]


metadata_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=40,
)


@given(metadata=st.dictionaries(st.text(max_size=8), metadata_values, max_size=4), depth=st.integers(0, 400),
       created_at=st.datetimes(timezones=st.none() | st.timezones()))
def test_every_decoded_event_serialises_in_every_output(
    metadata: dict[str, object], depth: int, created_at: dt.datetime
) -> None:
    """Whatever the metadata and timestamp, an event either fails to decode or all its outputs serialise."""
    # json, not orjson, writes the producer's bytes: it also writes integers past 64 bits
    raw = json.dumps(_event(metadata={**metadata, "deep": _nested(depth)}, created_at=created_at.isoformat())).encode()
    try:
        event = decode_event(raw)
    except DecodeError as exc:
        assert exc.reason in get_args(DecodeReason)
        return
    for body in _outputs(event):
        assert orjson.loads(body)["schema_version"] == 1


def _orjson_bytes(model: Verdict | ReviewRequest | Alert) -> bytes:
    """What ``to_json`` wrote before it used pydantic-core's serializer: orjson over the JSON-mode dump, without
    the added fields at their defaults. Readers (and the signatures over these bytes) saw this."""
    data = model.model_dump(mode="json")
    for name in model.added_fields:
        if getattr(model, name) == type(model).model_fields[name].default:
            del data[name]
    return orjson.dumps(data)


@given(metadata=st.dictionaries(st.text(max_size=8), metadata_values, max_size=4),
       content=st.text(max_size=40).filter(str.strip), score=st.floats(0.0, 1.0),
       latency=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300))
def test_outputs_serialise_to_the_same_bytes_as_orjson(metadata: dict[str, object], content: str, score: float,
                                                       latency: float) -> None:
    """Outputs are written by pydantic-core, byte for byte what orjson wrote: floats (shortest round-trip,
    exponents), string escapes, datetimes and key order alike."""
    try:
        orjson.dumps(metadata)
    except orjson.JSONEncodeError:  # integers past 64 bits: orjson never wrote such an output
        return
    event = ConversationEvent.model_validate(_event(metadata=metadata, messages=[{"role": "user", "content": content}]))
    verdict = Verdict(
        event_id=event.event_id, conversation_id=event.conversation_id, tenant=event.tenant, p_unsafe=score,
        dv=latency, delegated=False, decision="safe", source="probe",
        budget=BudgetState(alpha=0.1, threshold=score, window_rate=1 / 3), bundle_version="b", model_version="m",
        timings=Timings(queue_ms=latency, total_ms=score * 1e-7), decided_at=utcnow(), metadata=event.metadata,
        probe_p_unsafe=score, claimed_tenant="\u2028é",
    )
    review = ReviewRequest(event=event, p_unsafe=score, dv=None, reason="r", threshold=None, bundle_version="b",
                           requested_at=utcnow(), audit=True)
    for model in (verdict, review):
        assert model.to_json() == _orjson_bytes(model)


def test_dead_letter_fits_the_limit_and_identifies_the_original() -> None:
    raw = bytes(range(256)) * 3900  # ~1 MB of binary: base64 alone would be 1.33 MB
    record = dead_letter(reason="oversize", error="too big", topic="in", partition=1, offset=9, key=b"k" * 2000,
                         value=raw, stage="decode", max_bytes=1_000_000)
    body = record.to_json()
    assert len(body) <= 1_000_000
    parsed = orjson.loads(body)
    assert parsed["truncated"] is True and parsed["value_bytes"] == len(raw) and parsed["key_bytes"] == 2000
    assert parsed["value_sha256"] == hashlib.sha256(raw).hexdigest()
    prefix = base64.b64decode(parsed["value_b64"])
    assert raw.startswith(prefix) and len(prefix) > 700_000
    assert base64.b64decode(parsed["key_b64"]) == b"k" * 256
    small = dead_letter(reason="x", error="e", topic="in", partition=0, offset=0, key=None, value=b"abc",
                        stage="decode", max_bytes=1_000_000)
    assert small.truncated is False and base64.b64decode(small.value_b64) == b"abc" and small.value_bytes == 3


@given(size=st.integers(0, 20_000), limit=st.integers(1024, 12_000))
def test_dead_letter_never_exceeds_its_limit(size: int, limit: int) -> None:
    raw = b"\xfe" * size
    body = dead_letter(reason="oversize", error="e" * 3000, topic="in", partition=0, offset=1, key=b"k",
                       value=raw, stage="decode", max_bytes=limit).to_json()
    assert len(body) <= limit
    assert raw.startswith(base64.b64decode(orjson.loads(body)["value_b64"]))
