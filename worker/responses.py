"""Streamed responses: chunks in (topic ``responses``), one terminal verdict per response out.

The handler of the stream core (worker/stream.py) for responses read while they are generated. Per open
response it keeps the chunk order (``seq``: out-of-order chunks wait, duplicates are dropped), the token
probe's small running state, and its KV cache in a bounded store (probes/stream_scorer.py: only new tokens
run; an evicted cache is recomputed from the prefix). A response ends with one ``StreamVerdict``: ``stop`` at
the token where the smoothed score first crosses the calibrated threshold, else ``allow`` when its final chunk
arrives, or when no chunk came for ``response_timeout_s`` (or it fell too far out of order: ``gap``).

At-least-once: no chunk of an open response is done before its verdict is acknowledged, so the committed
offset never passes the first chunk of a response still open. After a crash or a rebalance the response's
chunks are read again from chunk 0 and re-scored from its prefix, which gives the same tokens, hence the same
decision (the verdict is keyed by ``response_id``; a repeat supersedes nothing new).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from aiokafka import TopicPartition

from probes.errors import ConfigError
from probes.logs import get_logger
from probes.monitor import Monitor
from probes.stream_scorer import Chunk, KVStore, ResponseState, StreamScorer, StreamStep
from probes.token_probe import TokenProbe
from worker.config import WorkerSettings
from worker.decode import DecodeError, decode_chunk
from worker.events import ResponseChunk, StreamVerdict, utcnow
from worker.metrics import ConsumerMetrics
from worker.response_order import ChunkOrder, ClosedSet
from worker.stream import Envelope, Message, OutputsSlot, Record, ServiceLimits, Stream, split_on_failure

log = get_logger(__name__)
Item = Envelope[ResponseChunk]
Reason = Literal["threshold", "final", "timeout", "gap"]


@dataclass
class Work:
    """One response of a scoring batch and its ready chunks not yet scored, in seq order."""

    response: OpenResponse
    chunks: deque[Item]


@dataclass
class OpenResponse:
    """One response being read: its chunk order, the chunks not yet scored, the envelopes it holds."""

    response_id: str
    order: ChunkOrder[Item]
    last_seen: float
    held: list[Item] = field(default_factory=list)
    ready: list[Item] = field(default_factory=list)
    state: ResponseState | None = None
    step: StreamStep | None = None
    last_seq: int = -1
    first: ResponseChunk | None = None


class ResponseHandler(OutputsSlot):
    """Response chunks in, stream verdicts out; torch runs on one inference thread, never on the loop."""

    name = "responses"

    def __init__(self, settings: WorkerSettings, scorer: StreamScorer, *, bundle_version: str,
                 model_version: str) -> None:
        self.settings = settings
        self.config = settings.responses
        self.scorer = scorer
        self.bundle_version = bundle_version
        self.model_version = model_version
        self.store = KVStore(max_bytes=self.config.kv_cache_max_bytes, max_entries=self.config.kv_cache_max_entries)
        self.open: dict[str, OpenResponse] = {}
        self.closed = ClosedSet(self.config.closed_memory)
        self.queue: deque[str] = deque()
        self._infer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ctd-stream-infer")
        self._wake = asyncio.Event()
        self._working = False

    # ---------------------------------------------------------------- handler protocol
    def busy(self) -> bool:
        return bool(self.queue) or self._working

    def waiting_on_purpose(self) -> bool:
        # Open responses hold their chunks uncommitted until their verdict: commits pause on purpose.
        return bool(self.open)

    def wake(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        self._infer.shutdown(wait=False, cancel_futures=True)

    def release(self, partitions: set[TopicPartition]) -> None:
        """Revoked partitions: drop their open responses unjudged; the new owner re-reads them from chunk 0."""
        for response in [r for r in self.open.values() if any(i.tp in partitions for i in r.held)]:
            self.open.pop(response.response_id, None)
            self.store.pop(response.response_id)
            if response.response_id in self.queue:
                self.queue.remove(response.response_id)
        log.info("responses.released", partitions=len(partitions), still_open=len(self.open))

    # ---------------------------------------------------------------- order
    async def accept(self, records: Sequence[Record]) -> None:
        now = time.monotonic()
        for record in records:
            try:
                chunk = decode_chunk(record.value, max_bytes=self.config.max_event_bytes)
            except DecodeError as exc:
                self.out.dead_letter(record, exc.reason, exc.detail, "decode")
                continue
            self.offer(Envelope.of(record, chunk, now), now)
        self._wake.set()

    def offer(self, item: Item, now: float) -> None:
        chunk = item.body
        rid = chunk.response_id
        if rid in self.closed:
            self.out.done(item)  # a late or repeated chunk of a response already judged
            return
        response = self.open.get(rid)
        if response is None:
            response = self.open[rid] = OpenResponse(rid, ChunkOrder(self.config.max_pending_chunks), now)
        status, ready = response.order.offer(chunk.seq, item)
        if status == "duplicate":
            self.out.done(item)
            return
        response.held.append(item)
        response.last_seen = now
        if status == "overflow":
            self._close(response, "gap")
            return
        if ready:
            response.ready.extend(ready)
            if rid not in self.queue:
                self.queue.append(rid)

    # ---------------------------------------------------------------- score
    async def run(self) -> None:
        tick = min(1.0, self.config.response_timeout_s / 4)
        while True:
            self._expire(time.monotonic())
            if not self.queue:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=tick)
                except TimeoutError:
                    pass
                continue
            batch = self._take_batch()
            if not batch:
                continue
            reasons: dict[str, Reason] = {}
            self._working = True
            try:
                await split_on_failure(batch, functools.partial(self._score, reasons=reasons), self._give_up,
                                       what="responses")
            finally:
                self._working = False
            for work in batch:
                reason = reasons.get(work.response.response_id)
                if reason is not None and self.open.get(work.response.response_id) is work.response:
                    self._close(work.response, reason)

    def _take_batch(self) -> list[Work]:
        """Up to ``max_batch`` queued responses, each with the chunks ready for it now (taken off it)."""
        batch: list[Work] = []
        while self.queue and len(batch) < self.config.max_batch:
            response = self.open.get(self.queue.popleft())
            if response is None or not response.ready:
                continue
            chunks, response.ready = response.ready, []
            batch.append(Work(response, deque(chunks)))
        return batch

    async def _score(self, part: list[Work], reasons: dict[str, Reason]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._infer, self._feed, part, reasons)

    def _give_up(self, work: Work, exc: Exception) -> None:
        if self.open.get(work.response.response_id) is work.response:
            self._fail(work.response, exc)

    def _feed(self, part: list[Work], reasons: dict[str, Reason]) -> None:
        """Inference thread: the chunks of ``part`` in rounds, one chunk of each response per batched pass.

        A chunk leaves its queue only once its pass has succeeded (``score_chunks`` changes nothing before),
        so a failed part can be split and retried from where each response stands: no chunk is read twice.
        """
        while live := [w for w in part if w.chunks and w.response.response_id not in reasons]:
            batch = []
            for work in live:
                chunk = work.chunks[0].body
                state = work.response.state or self.scorer.open(chunk.conversation())
                batch.append(Chunk(work.response.response_id, state, chunk.text, chunk.final))
            steps = self.scorer.score_chunks(batch, store=self.store)
            for work, scored, step in zip(live, batch, steps, strict=True):
                response, chunk = work.response, work.chunks.popleft().body
                if response.state is None:
                    response.first, response.state = chunk, scored.state
                response.step, response.last_seq = step, chunk.seq
                if step.stop_index is not None:
                    reasons[response.response_id] = "threshold"
                elif chunk.final:
                    reasons[response.response_id] = "final"

    def _expire(self, now: float) -> None:
        timeout = self.config.response_timeout_s
        for response in [r for r in self.open.values() if now - r.last_seen > timeout]:
            if response.response_id not in self.queue:
                self._close(response, "timeout")

    def _fail(self, response: OpenResponse, exc: Exception) -> None:
        log.error("response.inference_failed", response_id=response.response_id, error=repr(exc))
        self._forget(response)
        for item in response.held:
            self.out.dead_letter(item, "inference_error", repr(exc), "inference")

    # ---------------------------------------------------------------- verdict
    def _forget(self, response: OpenResponse) -> None:
        self.open.pop(response.response_id, None)
        self.closed.add(response.response_id)
        self.store.pop(response.response_id)

    def _close(self, response: OpenResponse, reason: Reason) -> None:
        self._forget(response)
        step = response.step
        probe = self.scorer.probe
        first = response.first or response.held[0].body
        stopped = step is not None and step.stop_index is not None
        verdict = StreamVerdict(
            response_id=response.response_id, conversation_id=first.conversation_id, tenant=first.tenant,
            decision="stop" if stopped else "allow", reason=reason,
            token_index=step.stop_index if step is not None else None,
            tokens_scored=step.scored_tokens if step is not None else 0, last_seq=response.last_seq,
            p_unsafe=step.p_unsafe if step is not None else 0.0, threshold=probe.settings.threshold,
            aggregator=probe.settings.aggregator, alpha=probe.settings.alpha, bundle_version=self.bundle_version,
            model_version=self.model_version, decided_at=utcnow(), metadata=first.metadata,
        )
        last, others = response.held[-1], response.held[:-1]
        message = Message(self.settings.topics.response_verdicts, verdict.to_json(), response.response_id.encode(),
                          [("response_id", response.response_id.encode())])

        def acked() -> None:
            # Only now may the response's other chunks count as done: before, a crash must re-read them all.
            for item in others:
                self.out.done(item)

        log.info("response.verdict", response_id=response.response_id, decision=verdict.decision, reason=reason,
                 tokens=verdict.tokens_scored)
        self.out.publish(last, [message], acked)


ResponseStream = Stream[ResponseHandler]


def refuse_exactly_once(settings: WorkerSettings) -> None:
    """Start-up check: this service runs at least once only.

    An open response holds its chunks' offsets uncommitted until its terminal verdict, and a revoke or a restart
    makes the next owner score it again from its first chunk: a transaction per commit would cover the verdict
    but not the per-response state a restart rebuilds, so exactly once is refused rather than claimed.
    """
    if settings.processing.exactly_once:
        raise ConfigError("processing.guarantee=exactly_once is not supported by the streamed-response service "
                          "(`ctd-monitor responses`): it keeps each open response's chunks uncommitted until its "
                          "terminal verdict and scores them again after a restart; run it with "
                          "processing.guarantee=at_least_once (a terminal verdict may then repeat after a crash)")


def response_stream(settings: WorkerSettings, monitor: Monitor, metrics: ConsumerMetrics | None = None,
                    **clients: object) -> ResponseStream:
    """The streamed-response service: the ``responses`` topic through ``ResponseHandler``."""
    refuse_exactly_once(settings)
    probe = TokenProbe.from_bundle(monitor.bundle)
    scorer = StreamScorer(monitor.extractor, probe, prefix_max_tokens=monitor.max_tokens)
    handler = ResponseHandler(settings, scorer, bundle_version=monitor.bundle.version,
                              model_version=monitor.model_version)
    metrics = metrics or ConsumerMetrics(prefix="ctd_responses", consumed_name="chunks_in",
                                         consumed_help="Response chunks consumed")
    r = settings.responses
    return Stream(handler, kafka=settings.kafka, group_id=r.group_id, topic=settings.topics.responses,
                  dead_letter_topic=settings.topics.dead_letter, metrics=metrics,
                  limits=ServiceLimits.from_config(r, max_event_bytes=r.max_event_bytes), **clients)  # type: ignore[arg-type]

