"""The OpenAI-compatible expert against a real local HTTP server speaking both the completions and chat APIs.

The server derives its logprobs from the prompt: a prompt holding ``p=0.37`` gets P(unsafe)=0.37 out of the
two-way softmax (the verdict tokens hold 90% of the mass, the rest goes to other tokens), so scores and their
order can be checked exactly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
import structlog
from pydantic import SecretStr

from probes.config import OpenAIExpertConfig
from probes.conversation import Conversation, conversation, single_turn
from probes.errors import ExpertError, ExpertUnavailable
from probes.experts.base import Expert
from probes.experts.openai_compatible import OpenAICompatibleExpert
from probes.logs import configure_logging

SECRET = "sk-test-0123456789-secret"
MARKER = "zebra-crossing-marker"  # conversation text that must never reach the logs


@dataclass
class ServerState:
    fail_first: int = 0  # answer the first N requests with `fail_status`
    fail_status: int = 503
    hang_first: int = 0  # sleep `hang_s` before answering the first N requests
    hang_s: float = 0.0
    always_status: int | None = None
    delay_s: float = 0.0  # per request, to make concurrency observable
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _p_from_text(text: str) -> float:
    found = re.search(r"p=([0-9.]+)", text)
    if found:
        return float(found.group(1))
    return 0.9 if "bomb" in text else 0.1


def _top(text: str) -> list[tuple[str, float]]:
    p = _p_from_text(text)
    top = [("Other", math.log(0.06)), ("I", math.log(0.04))]
    if "only-unsafe" in text:  # "safe" falls out of the top-k
        return [("unsafe", math.log(0.9 * p))] + top
    # Both leading-space and bare variants, as real tokenizers produce: they must add up.
    return [
        ("unsafe", math.log(0.9 * p)),
        (" safe", math.log(0.45 * (1 - p))),
        ("safe", math.log(0.45 * (1 - p))),
    ] + top


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: dict[str, Any] | str) -> None:
        raw = (body if isinstance(body, str) else json.dumps(body)).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def do_POST(self) -> None:
        state = self.server.state
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with state.lock:
            number = len(state.requests)
            state.requests.append({"path": self.path, "headers": dict(self.headers), "body": payload})
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            if number < state.hang_first:
                time.sleep(state.hang_s)
            if state.delay_s:
                time.sleep(state.delay_s)
            if state.always_status is not None:
                return self._send(
                    state.always_status, {"error": {"message": "bad request: max_tokens too large"}}
                )
            if number < state.fail_first:
                return self._send(state.fail_status, {"error": "overloaded"})
            if self.path == "/v1/completions":
                prompts = payload["prompt"] if isinstance(payload["prompt"], list) else [payload["prompt"]]
                # Reversed on purpose: clients must go by `index`, not list order.
                choices = [
                    {"index": i, "text": "x", "logprobs": {"tokens": ["x"], "top_logprobs": [dict(_top(p))]}}
                    for i, p in enumerate(prompts)
                ][::-1]
                return self._send(200, {"object": "text_completion", "choices": choices})
            if self.path == "/v1/chat/completions":
                text = "\n".join(m["content"] for m in payload["messages"])
                top = [{"token": t, "logprob": lp, "bytes": None} for t, lp in _top(text)]
                content = [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": "x"},
                    "logprobs": {"content": content},
                }
                return self._send(200, {"object": "chat.completion", "choices": [choice]})
            return self._send(404, {"error": "not found"})
        finally:
            with state.lock:
                state.in_flight -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = ServerState()


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _config(srv: _Server, **overrides: Any) -> OpenAIExpertConfig:
    host, port = srv.server_address[:2]
    values: dict[str, Any] = {
        "base_url": f"http://{host!s}:{port}/v1",
        "model": "guard-test",
        "timeout_s": 2.0,
        "max_retries": 3,
        "backoff_s": 0.01,
        "concurrency": 4,
        "top_logprobs": 5,
    }
    values.update(overrides)
    return OpenAIExpertConfig(**values)


PS = [0.37, 0.91, 0.05, 0.5, 0.73]
CONVS: list[Conversation] = [single_turn(f"question p={p}") for p in PS]


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_scores_in_order_for_both_apis(server: _Server, api: str) -> None:
    expert = OpenAICompatibleExpert(_config(server), api=api)  # type: ignore[arg-type]
    assert isinstance(expert, Expert) and expert.name == "openai-compatible:guard-test"
    assert expert.parameters_per_token() == 0
    scores = expert.score(CONVS)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, PS, atol=1e-9)
    body = server.state.requests[0]["body"]
    assert body["model"] == "guard-test" and body["max_tokens"] == 1 and body["temperature"] == 0
    if api == "completions":
        assert server.state.requests[0]["path"] == "/v1/completions" and body["logprobs"] == 5
        assert (
            "Task: Check if there is unsafe content" in body["prompt"]
            and "User: question p=" in body["prompt"]
        )
    else:
        assert server.state.requests[0]["path"] == "/v1/chat/completions"
        assert body["logprobs"] is True and body["top_logprobs"] == 5
        assert [m["role"] for m in body["messages"]] == ["user"]


def test_chat_can_send_the_conversation_itself(server: _Server) -> None:
    conv = conversation([("user", "hello p=0.2"), ("assistant", "hi there")])
    expert = OpenAICompatibleExpert(_config(server), api="chat", chat_messages="conversation")
    assert expert.score([conv])[0] == pytest.approx(0.2)
    assert server.state.requests[0]["body"]["messages"] == [
        {"role": "user", "content": "hello p=0.2"},
        {"role": "assistant", "content": "hi there"},
    ]


def test_list_prompts_map_back_by_index_and_missing_safe_uses_the_floor(server: _Server) -> None:
    expert = OpenAICompatibleExpert(_config(server), prompts_per_request=2)
    convs = CONVS + [single_turn("only-unsafe p=0.5")]
    scores = expert.score(convs)
    # "safe" absent: bounded by the smallest listed log-prob (0.04) -> 0.45 / (0.45 + 0.04)
    np.testing.assert_allclose(scores, PS + [0.45 / 0.49], atol=1e-9)
    assert len(server.state.requests) == 3 and isinstance(server.state.requests[0]["body"]["prompt"], list)


async def test_ascore_runs_requests_concurrently_within_the_bound(server: _Server) -> None:
    server.state.delay_s = 0.15
    convs = [single_turn(f"p=0.{i + 1}") for i in range(9)]
    expert = OpenAICompatibleExpert(_config(server, concurrency=3))
    started = time.monotonic()
    scores = await expert.ascore(convs)
    elapsed = time.monotonic() - started
    await expert.aclose()
    np.testing.assert_allclose(scores, [(i + 1) / 10 for i in range(9)], atol=1e-9)
    assert server.state.max_in_flight == 3
    assert elapsed < 9 * 0.15  # sequential would take at least this long


async def test_ascore_reuses_its_client_and_score_refuses_a_running_loop(server: _Server) -> None:
    async with OpenAICompatibleExpert(_config(server)) as expert:
        first = await expert.ascore(CONVS[:2])
        client = expert._client
        second = await expert.ascore(CONVS[:2])
        assert expert._client is client and client is not None
        np.testing.assert_array_equal(first, second)
        with pytest.raises(RuntimeError, match="await ascore"):
            expert.score(CONVS[:1])
    assert expert._client is None


@pytest.mark.parametrize("status", [503, 429, 500])
def test_transient_statuses_are_retried_then_succeed(server: _Server, status: int) -> None:
    server.state.fail_first, server.state.fail_status = 2, status
    expert = OpenAICompatibleExpert(_config(server, max_retries=3))
    assert expert.score(CONVS[:1])[0] == pytest.approx(PS[0])
    assert len(server.state.requests) == 3


def test_timeout_is_retried(server: _Server) -> None:
    server.state.hang_first, server.state.hang_s = 1, 1.5
    expert = OpenAICompatibleExpert(_config(server, timeout_s=0.3, max_retries=2))
    assert expert.score(CONVS[:1])[0] == pytest.approx(PS[0])
    assert len(server.state.requests) == 2


def test_retries_exhausted_is_unavailable(server: _Server) -> None:
    server.state.always_status = 503
    expert = OpenAICompatibleExpert(_config(server, max_retries=2))
    with pytest.raises(ExpertUnavailable, match="3 time"):
        expert.score(CONVS[:1])
    assert len(server.state.requests) == 3


def test_hanging_server_exhausts_into_unavailable(server: _Server) -> None:
    server.state.hang_first, server.state.hang_s = 10, 1.0
    expert = OpenAICompatibleExpert(_config(server, timeout_s=0.2, max_retries=1))
    with pytest.raises(ExpertUnavailable, match="Timeout"):
        expert.score(CONVS[:1])


def test_connection_refused_is_unavailable() -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        port = closed.server_address[1]
    config = OpenAIExpertConfig(base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_s=0.01)
    with pytest.raises(ExpertUnavailable, match="ConnectError"):
        OpenAICompatibleExpert(config).score(CONVS[:1])


def test_client_error_is_not_retried(server: _Server) -> None:
    server.state.always_status = 400
    expert = OpenAICompatibleExpert(_config(server, max_retries=3))
    with pytest.raises(ExpertError, match="HTTP 400.*max_tokens too large") as info:
        expert.score(CONVS[:1])
    assert not isinstance(info.value, ExpertUnavailable)
    assert len(server.state.requests) == 1


def test_auth_header_is_sent_and_never_logged(server: _Server, caplog: pytest.LogCaptureFixture) -> None:
    server.state.fail_first = 1  # a retry, so that warnings are logged too
    expert = OpenAICompatibleExpert(_config(server, api_key=SecretStr(SECRET)))
    configure_logging("DEBUG")
    try:
        with structlog.testing.capture_logs() as events, caplog.at_level(logging.DEBUG):
            expert.score([single_turn(f"{MARKER} p=0.4")])
    finally:
        configure_logging("WARNING")
    assert server.state.requests[-1]["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert any(e["event"] == "openai_expert.retry" for e in events)
    logged = repr(events) + caplog.text
    assert SECRET not in logged and MARKER not in logged
    assert SECRET not in repr(expert)


def test_no_auth_header_without_a_key(server: _Server) -> None:
    OpenAICompatibleExpert(_config(server)).score(CONVS[:1])
    assert "Authorization" not in server.state.requests[0]["headers"]


def test_mock_transport_unit() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(
            {
                "url": str(request.url),
                "auth": request.headers.get("authorization"),
                "body": json.loads(request.content),
            }
        )
        top = {"unsafe": math.log(0.3), "safe": math.log(0.1), "\n": math.log(0.5)}
        return httpx.Response(200, json={"choices": [{"index": 0, "logprobs": {"top_logprobs": [top]}}]})

    config = OpenAIExpertConfig(base_url="http://guard.invalid/v1/", model="lg3", api_key=SecretStr("k"))
    expert = OpenAICompatibleExpert(
        config, transport=httpx.MockTransport(handler), params_per_token=8_000_000_000
    )
    scores = expert.score([single_turn("hi")])
    assert scores.tolist() == pytest.approx([0.75])
    assert expert.parameters_per_token() == 8_000_000_000
    assert seen[0]["url"] == "http://guard.invalid/v1/completions" and seen[0]["auth"] == "Bearer k"
    assert seen[0]["body"] == {
        "model": "lg3",
        "prompt": seen[0]["body"]["prompt"],
        "max_tokens": 1,
        "logprobs": 20,
        "temperature": 0,
    }
    assert seen[0]["body"]["prompt"].count("User: hi") == 1


def test_malformed_responses_are_expert_errors() -> None:
    bodies: list[Any] = [
        {"choices": [{"index": 0, "logprobs": None}]},  # server ignored `logprobs`
        {"choices": []},
        {"choices": [{"index": 0, "logprobs": {"top_logprobs": [{"Hello": -0.1}]}}]},  # no verdict token
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=bodies.pop(0))

    expert = OpenAICompatibleExpert(OpenAIExpertConfig(), transport=httpx.MockTransport(handler))
    for match in ("lacks first-token logprobs", "0 choices", "neither"):
        with pytest.raises(ExpertError, match=match) as info:
            expert.score([single_turn("x")])
        assert not isinstance(info.value, ExpertUnavailable)
    assert expert.score([]).shape == (0,)


def test_one_failure_cancels_the_rest() -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if b"p=0.1" in request.content:
            return httpx.Response(400, text="nope")
        await asyncio.sleep(5)
        return httpx.Response(503)

    expert = OpenAICompatibleExpert(OpenAIExpertConfig(concurrency=4), transport=httpx.MockTransport(handler))
    started = time.monotonic()
    with pytest.raises(ExpertError, match="HTTP 400"):
        expert.score([single_turn("p=0.5"), single_turn("p=0.1"), single_turn("p=0.7")])
    assert time.monotonic() - started < 2 and calls == 3
