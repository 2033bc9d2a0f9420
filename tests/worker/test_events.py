from __future__ import annotations

import base64
from pathlib import Path
from typing import get_args

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.decode import DecodeError, DecodeReason, decode_event
from worker.events import ConversationEvent, dead_letter, json_schemas

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
    ],
)
def test_bad_inputs_have_reasons(raw: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_event(raw, max_bytes=4096)
    assert info.value.reason == reason


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
