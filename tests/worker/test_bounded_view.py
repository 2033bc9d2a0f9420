"""Every conversation gets a verdict: events past the message or content limits decode to a bounded view."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from worker.config import WorkerConfig
from worker.decode import DecodeError, ViewLimits, decode_event, decode_viewed
from worker.events import MAX_MESSAGES, ReviewRequest, Verdict


def _event(messages: list[dict[str, Any]], **extra: Any) -> bytes:
    return orjson.dumps({"event_id": "e", "conversation_id": "c", "created_at": "2026-01-01T00:00:00Z",
                         "messages": messages, **extra})


def _chat(n: int, size: int = 20) -> list[dict[str, Any]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i:04d} " + "x" * size} for i in range(n)]


def test_events_within_the_limits_are_decoded_whole_without_a_view() -> None:
    raw = _event(_chat(40))
    viewed = decode_viewed(raw, view=ViewLimits())
    assert viewed.view is None and viewed.event == decode_event(raw)


def test_a_600_message_conversation_keeps_its_head_and_tail() -> None:
    with pytest.raises(DecodeError):  # the strict decoder (before the view) refuses it
        decode_event(_event(_chat(600)))
    viewed = decode_viewed(_event(_chat(600)), view=ViewLimits(head=4, tail=10))
    contents = [m.content.split()[0] for m in viewed.event.messages]
    assert contents == [f"m{i:04d}" for i in (*range(4), *range(590, 600))]
    assert viewed.view is not None
    assert (viewed.view.messages, viewed.view.head, viewed.view.tail, viewed.view.capped) == (600, 4, 10, 0)
    assert viewed.view.kept_bytes == sum(len(m.content.encode()) for m in viewed.event.messages)


def test_a_huge_message_is_cut_to_its_first_and_last_bytes_and_the_view_stays_in_its_budget() -> None:
    big = "HEAD" + "é" * 700_000 + "TAIL"  # 1.4 MB of UTF-8, more characters than a message may hold
    raw = _event([{"role": "system", "content": "be safe"}, *_chat(30, 50_000), {"role": "user", "content": big}])
    assert len(raw) > 2_000_000
    limits = ViewLimits(max_bytes=300_000, message_bytes=100_000, head=2, tail=100)
    viewed = decode_viewed(raw, view=limits, max_bytes=4_000_000)
    view = viewed.view
    assert view is not None and view.messages == 32 and view.content_bytes > 2_000_000
    last = viewed.event.messages[-1].content
    assert last.startswith("HEAD") and last.endswith("TAIL") and len(last.encode()) <= 100_000 + 10
    assert viewed.event.messages[0].content == "be safe"  # the head (system prompt) is kept
    assert view.kept_bytes <= limits.max_bytes and view.capped == 1
    assert view.kept_bytes == sum(len(m.content.encode()) for m in viewed.event.messages)
    # the newest messages are kept before older tail ones when the budget runs out
    kept = [m.content[:5] for m in viewed.event.messages[2:-1]]
    assert kept == sorted(kept) and kept[-1] == "m0029"


def test_past_the_transport_limit_and_undecodable_input_are_still_dead_lettered() -> None:
    limits = ViewLimits()
    with pytest.raises(DecodeError) as oversize:
        decode_viewed(_event(_chat(10, 5000)), view=limits, max_bytes=20_000)
    assert oversize.value.reason == "oversize"
    for raw, reason in ((b"{nope", "invalid_json"), (b"\xff\xfe", "undecodable_utf8"),
                        (orjson.dumps({"event_id": "x", "messages": _chat(600)}), "schema_violation")):
        with pytest.raises(DecodeError) as exc:
            decode_viewed(raw, view=limits)
        assert exc.value.reason == reason
    # a malformed message the view keeps is still a schema violation
    bad = [*_chat(599), {"role": "robot", "content": "hi"}]
    with pytest.raises(DecodeError) as exc:
        decode_viewed(_event(bad), view=limits)
    assert exc.value.reason == "schema_violation"


def test_the_view_travels_in_the_verdict_and_review_request_and_settings_bound_it() -> None:
    viewed = decode_viewed(_event(_chat(MAX_MESSAGES + 1)), view=ViewLimits())
    assert viewed.view is not None
    body = orjson.loads(ReviewRequest(event=viewed.event, p_unsafe=0.5, dv=None, reason="t", threshold=None,
                                      bundle_version="b", requested_at=viewed.event.created_at,
                                      view=viewed.view).to_json())
    assert body["view"]["kind"] == "bounded" and body["view"]["messages"] == MAX_MESSAGES + 1
    assert "view" not in orjson.loads(Verdict.model_validate(_verdict()).to_json())  # absent while unused
    with pytest.raises(ValueError):
        WorkerConfig(view_head_messages=300, view_tail_messages=300)
    with pytest.raises(ValueError):
        ViewLimits(head=300, tail=300)


def _verdict() -> dict[str, Any]:
    return {"event_id": "e", "conversation_id": "c", "tenant": "t", "p_unsafe": 0.5, "delegated": False,
            "decision": "safe", "source": "probe", "budget": {}, "bundle_version": "b", "model_version": "m",
            "timings": {}, "decided_at": "2026-01-01T00:00:00Z"}
