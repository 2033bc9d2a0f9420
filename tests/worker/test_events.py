from __future__ import annotations

import base64
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.events import (
    ConversationEvent,
    DecodeError,
    dead_letter,
    decode_event,
    json_schemas,
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
