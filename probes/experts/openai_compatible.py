"""A guard LLM behind an OpenAI-compatible HTTP endpoint (how vLLM serves Llama Guard), scored from logprobs.

Two request shapes:
- ``completions``: ``POST {base_url}/completions`` with the full guard prompt; the template must end where
  the verdict starts (Llama Guard 3 written out by hand ends in
  ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``).
- ``chat``: ``POST {base_url}/chat/completions``; the server applies the model's chat template. With
  ``chat_messages="template"`` the filled guard prompt goes as one user message; with ``"conversation"`` the
  conversation's own messages go as they are, for guards whose chat template builds the guard prompt itself
  (Llama Guard 3 on vLLM).

Transient failures (connect errors, timeouts, 429, 5xx) are retried with jittered exponential backoff and end
in ExpertUnavailable; any other 4xx is a request the server will never accept and raises ExpertError at once.
Logs carry counts, statuses and timings only: never prompts, responses or the API key.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any, Literal, Self

import httpx
import numpy as np
import numpy.typing as npt

from probes.activations.normalise import normalise
from probes.config import OpenAIExpertConfig
from probes.conversation import Conversation
from probes.errors import ConfigError, ExpertError, ExpertUnavailable
from probes.experts.guard_prompt import guard_prompt, p_unsafe_from_top_logprobs
from probes.logs import get_logger

log = get_logger(__name__)

Api = Literal["completions", "chat"]
ChatMessages = Literal["template", "conversation"]

# Network-level failures worth another try. UnsupportedProtocol, ProxyError and LocalProtocolError are left
# out: they are configuration or client bugs that the next attempt would hit again.
_TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)
_BODY_EXCERPT = 200
_MAX_BACKOFF_S = 30.0


def _is_transient_status(status: int) -> bool:
    return status == 429 or status >= 500


class _Transient(Exception):
    """One failed attempt that a later attempt may fix; ``reason`` is safe to log (no payload)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OpenAICompatibleExpert:
    """P(unsafe) from the first-token top logprobs of a remote guard model."""

    def __init__(
        self,
        config: OpenAIExpertConfig,
        *,
        api: Api = "completions",
        chat_messages: ChatMessages = "template",
        prompts_per_request: int = 1,
        params_per_token: int = 0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if api not in ("completions", "chat"):
            raise ConfigError(f"api must be 'completions' or 'chat', not {api!r}")
        if chat_messages not in ("template", "conversation"):
            raise ConfigError(f"chat_messages must be 'template' or 'conversation', not {chat_messages!r}")
        if prompts_per_request < 1:
            raise ConfigError("prompts_per_request must be at least 1")
        if api == "chat" and prompts_per_request != 1:
            # The chat API has no list form: one conversation per request.
            raise ConfigError("prompts_per_request > 1 needs api='completions'")
        if config.max_retries < 0 or config.backoff_s < 0 or config.timeout_s <= 0:
            raise ConfigError("openai expert needs max_retries >= 0, backoff_s >= 0 and timeout_s > 0")
        self.config = config
        self.api: Api = api
        self.chat_messages: ChatMessages = chat_messages
        self.prompts_per_request = prompts_per_request
        self._params_per_token = params_per_token
        self._transport = transport
        self._url = config.base_url.rstrip("/") + (
            "/completions" if api == "completions" else "/chat/completions"
        )
        self._name = f"openai-compatible:{config.model}"
        # The client and semaphore of the event loop ascore() last ran on: both are tied to one loop.
        self._client: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"OpenAICompatibleExpert(name={self._name!r}, api={self.api!r}, url={self._url!r})"

    @property
    def name(self) -> str:
        return self._name

    def parameters_per_token(self) -> int:
        return self._params_per_token

    # ---- client lifecycle -------------------------------------------------------------------------------

    def _new_client(self) -> httpx.AsyncClient:
        headers = {"Content-Type": "application/json"}
        key = self.config.api_key.get_secret_value()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.AsyncClient(
            timeout=httpx.Timeout(self.config.timeout_s),
            headers=headers,
            transport=self._transport,
            # Enough pooled connections for every concurrent request: no request waits on the pool, so the
            # timeout measures the server, not our own queue.
            limits=httpx.Limits(
                max_connections=self.config.concurrency, max_keepalive_connections=self.config.concurrency
            ),
        )

    def _loop_state(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._client is None or self._semaphore is None or self._loop is not loop:
            if self._client is not None:
                # Its connections belong to another (likely closed) loop and cannot be closed from this one.
                log.debug("openai_expert.client_rebound", expert=self._name)
            self._client = self._new_client()
            self._semaphore = asyncio.Semaphore(self.config.concurrency)
            self._loop = loop
        return self._client, self._semaphore

    async def aclose(self) -> None:
        client, self._client, self._semaphore, self._loop = self._client, None, None, None
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- scoring ----------------------------------------------------------------------------------------

    async def ascore(self, conversations: Sequence[Conversation]) -> npt.NDArray[np.float64]:
        """P(unsafe) per conversation, in order; reuses one client per event loop across calls."""
        client, semaphore = self._loop_state()
        return await self._score_with(client, semaphore, conversations)

    def score(self, conversations: Sequence[Conversation]) -> npt.NDArray[np.float64]:
        """Blocking ascore() for offline tooling; inside an event loop, await ascore() instead."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "OpenAICompatibleExpert.score() was called from a running event loop; await ascore() instead"
            )

        async def run() -> npt.NDArray[np.float64]:
            # A private client: the one ascore() keeps is bound to the service's loop, not this throwaway one.
            async with self._new_client() as client:
                return await self._score_with(
                    client, asyncio.Semaphore(self.config.concurrency), conversations
                )

        return asyncio.run(run())

    async def _score_with(
        self, client: httpx.AsyncClient, semaphore: asyncio.Semaphore, conversations: Sequence[Conversation]
    ) -> npt.NDArray[np.float64]:
        out = np.zeros(len(conversations), dtype=np.float64)
        if not conversations:
            return out
        step = self.prompts_per_request
        chunks = [
            list(range(start, min(start + step, len(conversations))))
            for start in range(0, len(conversations), step)
        ]
        loop = asyncio.get_running_loop()
        started = loop.time()
        tasks = [
            asyncio.ensure_future(self._score_chunk(client, semaphore, [conversations[i] for i in chunk]))
            for chunk in chunks
        ]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            # One failed chunk fails the call: stop the others rather than let them retry in the background.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        for chunk, scores in zip(chunks, results):
            out[chunk] = scores
        log.debug(
            "openai_expert.scored",
            expert=self._name,
            n=len(conversations),
            requests=len(chunks),
            seconds=round(loop.time() - started, 3),
        )
        return out

    def _payload(self, conversations: Sequence[Conversation]) -> dict[str, Any]:
        cfg = self.config
        if self.api == "completions":
            prompts = [guard_prompt(cfg.prompt_template, c) for c in conversations]
            return {
                "model": cfg.model,
                "prompt": prompts[0] if len(prompts) == 1 else prompts,
                "max_tokens": 1,
                "logprobs": cfg.top_logprobs,
                "temperature": 0,
            }
        (conversation,) = conversations
        if self.chat_messages == "template":
            messages = [{"role": "user", "content": guard_prompt(cfg.prompt_template, conversation)}]
        else:
            # The server applies its own template; the content is normalised as the probe read it.
            messages = [{"role": m.role, "content": normalise(m.content)} for m in conversation]
        return {
            "model": cfg.model,
            "messages": messages,
            "max_tokens": 1,
            "logprobs": True,
            "top_logprobs": cfg.top_logprobs,
            "temperature": 0,
        }

    async def _score_chunk(
        self, client: httpx.AsyncClient, semaphore: asyncio.Semaphore, conversations: Sequence[Conversation]
    ) -> list[float]:
        payload = self._payload(conversations)
        body = await self._post(client, semaphore, payload)
        return self._parse(body, len(conversations))

    async def _post(
        self, client: httpx.AsyncClient, semaphore: asyncio.Semaphore, payload: dict[str, Any]
    ) -> Any:
        cfg = self.config
        attempts = cfg.max_retries + 1
        last = ""
        for attempt in range(attempts):
            try:
                # The slot is held for one attempt only: a request sleeping in backoff leaves room for others.
                async with semaphore:
                    return await self._attempt(client, payload)
            except _Transient as exc:
                last = exc.reason
            if attempt + 1 < attempts:
                # Jitter spreads the retries of requests that failed together (a 429 burst) over time.
                delay = min(cfg.backoff_s * 2**attempt, _MAX_BACKOFF_S) * random.uniform(0.5, 1.0)
                log.warning(
                    "openai_expert.retry",
                    expert=self._name,
                    attempt=attempt + 1,
                    of=attempts,
                    reason=last,
                    delay_s=round(delay, 3),
                )
                await asyncio.sleep(delay)
        log.error("openai_expert.unavailable", expert=self._name, attempts=attempts, reason=last)
        raise ExpertUnavailable(f"{self._name}: {self._url} failed {attempts} time(s); last: {last}")

    async def _attempt(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> Any:
        try:
            response = await client.post(self._url, json=payload)
        except _TRANSIENT_ERRORS as exc:
            raise _Transient(type(exc).__name__) from exc
        except httpx.HTTPError as exc:
            raise ExpertError(
                f"{self._name}: request to {self._url} failed: {type(exc).__name__}: {exc}"
            ) from exc
        status = response.status_code
        if _is_transient_status(status):
            raise _Transient(f"HTTP {status}")
        if status >= 400:
            # Not logged: an error body may echo the prompt back. The excerpt goes to the caller only.
            excerpt = response.text[:_BODY_EXCERPT].replace("\n", " ")
            raise ExpertError(f"{self._name}: HTTP {status} from {self._url}: {excerpt}")
        try:
            return response.json()
        except ValueError as exc:
            raise ExpertError(f"{self._name}: HTTP {status} with a body that is not JSON") from exc

    def _parse(self, body: Any, expected: int) -> list[float]:
        try:
            choices = list(body["choices"])
            if len(choices) != expected:
                raise ExpertError(f"{len(choices)} choices for {expected} prompt(s)")
            # List prompts come back tagged with their index; the order of the list itself is not promised.
            if expected > 1 and all(isinstance(c, dict) and "index" in c for c in choices):
                choices.sort(key=lambda c: int(c["index"]))
            scores = []
            for choice in choices:
                logprobs = choice["logprobs"]
                if self.api == "completions":
                    top: Any = logprobs["top_logprobs"][0]
                    pairs = [(str(t), float(lp)) for t, lp in top.items()]
                else:
                    top = logprobs["content"][0]["top_logprobs"]
                    pairs = [(str(item["token"]), float(item["logprob"])) for item in top]
                scores.append(
                    p_unsafe_from_top_logprobs(
                        pairs, unsafe_token=self.config.unsafe_token, safe_token=self.config.safe_token
                    )
                )
        except ExpertError as exc:
            raise ExpertError(f"{self._name}: {exc}") from exc
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise ExpertError(
                f"{self._name}: response lacks first-token logprobs ({type(exc).__name__}); "
                f"does the server support {'logprobs' if self.api == 'completions' else 'top_logprobs'}?"
            ) from exc
        return scores
