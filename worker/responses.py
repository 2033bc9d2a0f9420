"""Streamed responses: chunks in (topic ``responses``), one terminal verdict per response out.

The handler of the stream core (worker/stream.py) for responses read while they are generated. Per open
response it keeps the chunk order (``seq``: out-of-order chunks wait, duplicates are dropped, a seq more than
``max_pending_chunks`` ahead is dead-lettered and changes nothing), the token probe's small running state, and
its KV cache in a bounded store (probes/runtime/stream_scorer.py: only new tokens run; an evicted cache is recomputed
from the prefix). A response ends with one ``StreamVerdict`` (signed with the worker role's key,
worker/signing.py): ``stop`` at the token where the smoothed score
first crosses the calibrated threshold, ``allow`` only when its final chunk was read; everything else fails
closed: no chunk for ``response_timeout_s`` (``timeout``, or ``gap`` while a chunk is missing), more chunks or
text than the per-response limits (``limit``, the rest dead-lettered; also a response longer than
``max_read_tokens`` tokens, the rest of which is never read), an inference failure (``error``) each end in ``stop``
with a critical alert (source ``stream``) on the alerts topic. Past the bundle's window a response is read on a
rolling context (probes/runtime/stream_scorer.py), so a verdict covers every token of it.

At-least-once with checkpoints (``responses.checkpoint``, default): once a round of chunks is scored, the
response's state goes to the compacted ``response-state`` topic (worker/response_state.py) and those chunks are
done when it is acknowledged, so commits advance while responses stay open. Only chunks waiting out of order
(at most ``max_pending_chunks`` a response, at most ``response_timeout_s``) and chunks being scored hold their
partition's commit, and a partition with ``partition_max_in_flight`` uncommitted chunks pauses alone. After a
restart or a rebalance, the first records of a newly assigned partition wait until the state topic is read to
its end; the partition's open responses then resume from their checkpoints (their timeout counts anew), and
re-delivered chunks already checkpointed are duplicates. Without checkpoints, no chunk of an open response is
done before its verdict is acknowledged and a response is re-read from chunk 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka import TopicPartition

from probes.errors import ConfigError
from probes.heads.token_probe import TokenProbe
from probes.logs import get_logger
from probes.runtime.kv_store import KVStore
from probes.runtime.monitor import Monitor
from probes.runtime.stream_scorer import Chunk, ResponseState, StreamScorer, StreamStep
from worker.config import WorkerSettings
from worker.decode import DecodeError, decode_chunk
from worker.events import Alert, ResponseChunk, StreamVerdict, utcnow
from worker.metrics import ConsumerMetrics
from worker.response_order import ChunkOrder, ClosedSet
from worker.response_state import KafkaStateLog, ResponseCheckpoint, StateLog
from worker.signing import WORKER, Signer
from worker.stream import Envelope, Message, OutputsSlot, Record, ServiceLimits, Stream, split_on_failure

log = get_logger(__name__)
Item = Envelope[ResponseChunk]
Reason = Literal["threshold", "final", "timeout", "gap", "limit", "error"]
# Reasons a response ends without having been read to its end: decided "stop", with an alert.
UNSCORED: frozenset[str] = frozenset({"timeout", "gap", "limit", "error"})
STREAM_ALERT_NAMESPACE = uuid.UUID("0b7d5a8e-3c61-4f2a-9d0e-5e1f7a2c4b93")


@dataclass
class Work:
    """One response of a scoring batch: its ready chunks not yet scored (seq order), and those scored now."""

    response: OpenResponse
    chunks: deque[Item]
    scored: list[Item] = field(default_factory=list)


@dataclass(frozen=True)
class Meta:
    """What a verdict repeats from a response's chunk 0."""

    tenant: str
    conversation_id: str | None
    metadata: dict[str, Any]


@dataclass
class OpenResponse:
    """One response being read: its chunk order, the chunks not yet scored, the envelopes not yet done."""

    response_id: str
    tp: TopicPartition
    order: ChunkOrder[Item]
    last_seen: float
    #: Accepted and not yet done: waiting out of order, ready, or scored with their checkpoint not yet sent.
    held: list[Item] = field(default_factory=list)
    ready: list[Item] = field(default_factory=list)
    state: ResponseState | None = None
    step: StreamStep | None = None
    last_seq: int = -1
    meta: Meta | None = None
    chunks: int = 0
    bytes: int = 0
    #: Which per-response limit closed it (reason ``limit``): chunks, bytes or tokens; in the alert.
    limit: str | None = None


class ResponseHandler(OutputsSlot):
    """Response chunks in, stream verdicts out; torch runs on one inference thread, never on the loop."""

    name = "responses"

    def __init__(self, settings: WorkerSettings, scorer: StreamScorer, *, bundle_version: str,
                 model_version: str, state_log: StateLog | None = None,
                 metrics: ConsumerMetrics | None = None) -> None:
        self.settings = settings
        self.config = settings.responses
        self.scorer = scorer
        self.bundle_version = bundle_version
        self.model_version = model_version
        # Stream verdicts, stream alerts and checkpoints are the worker role's records: signed with its key like
        # the conversation verdicts; checkpoints are read back only if that role signed them.
        self.signer = Signer.from_config(settings.signing, "worker", service="responses",
                                         verifies=WORKER if self.config.checkpoint else (),
                                         insecure_gauge=metrics.signing_insecure if metrics is not None else None)
        if self.config.checkpoint and state_log is None:
            state_log = KafkaStateLog(settings.kafka, settings.topics.response_state,
                                      max_bytes=self.config.max_event_bytes, signer=self.signer)
        self.state_log = state_log if self.config.checkpoint else None
        self.store = KVStore(max_bytes=self.config.kv_cache_max_bytes, max_entries=self.config.kv_cache_max_entries)
        self.open: dict[str, OpenResponse] = {}
        self.closed = ClosedSet(self.config.closed_memory)
        self.queue: deque[str] = deque()
        #: Checkpoints read from the state topic for responses not open here (yet): resumed on assignment.
        self.saved: dict[str, ResponseCheckpoint] = {}
        self.known: set[TopicPartition] = set()
        self._infer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ctd-stream-infer")
        self._wake = asyncio.Event()
        self._working = False

    # ---------------------------------------------------------------- handler protocol
    def busy(self) -> bool:
        return bool(self.queue) or self._working

    def waiting_on_purpose(self) -> bool:
        # Open responses hold chunks (out of order, or all of them without checkpoints) until their verdict.
        return bool(self.open)

    def wake(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        self._infer.shutdown(wait=False, cancel_futures=True)
        if self.state_log is not None:
            await self.state_log.close()

    def release(self, partitions: set[TopicPartition]) -> None:
        """Revoked partitions: drop their open responses unjudged; the new owner resumes them from their
        checkpoints (or re-reads them from chunk 0 without)."""
        for response in [r for r in self.open.values() if r.tp in partitions]:
            self.open.pop(response.response_id, None)
            self.store.pop(response.response_id)
            if response.response_id in self.queue:
                self.queue.remove(response.response_id)
        self.known -= partitions
        log.info("responses.released", partitions=len(partitions), still_open=len(self.open))

    # ---------------------------------------------------------------- order
    async def accept(self, records: Sequence[Record]) -> None:
        fresh = {TopicPartition(r.topic, r.partition) for r in records} - self.known
        if fresh:
            await self._resume(fresh)
        now = time.monotonic()
        for record in records:
            try:
                chunk = decode_chunk(record.value, max_bytes=self.config.max_event_bytes)
            except DecodeError as exc:
                self.out.dead_letter(record, exc.reason, exc.detail, "decode")
                continue
            self.offer(Envelope.of(record, chunk, now), now)
        self._wake.set()

    async def _resume(self, partitions: set[TopicPartition]) -> None:
        """Newly assigned partitions: read the state topic to its end, resume their open responses."""
        if self.state_log is not None:
            for checkpoint in await self.state_log.read_new():
                rid = checkpoint.response_id
                if rid in self.open:
                    continue  # ours, and further along in memory than any record of it
                if checkpoint.closed is not None:
                    self.saved.pop(rid, None)
                    self.closed.add(rid, checkpoint.closed)
                    continue
                if rid in self.closed:
                    continue
                known = self.saved.get(rid)
                if known is None or checkpoint.further_than(known):
                    self.saved[rid] = checkpoint
            now = time.monotonic()
            for rid, checkpoint in list(self.saved.items()):
                tp = TopicPartition(checkpoint.topic, checkpoint.partition)
                if tp in partitions:
                    del self.saved[rid]
                    try:
                        self.open[rid] = self._resumed(checkpoint, tp, now)
                    except Exception as exc:  # noqa: BLE001 - one checkpoint must not stop the partition
                        # Signed by our role yet not resumable (a bug, or a version skew): what it scored is lost,
                        # so the response cannot be judged in full and ends as an inference failure does.
                        log.error("responses.resume_failed", response_id=rid, error=type(exc).__name__)
                        self._close(self._checkpointed(checkpoint, tp, now), "error")
            log.info("responses.resumed", partitions=len(partitions),
                     open=sum(r.tp in partitions for r in self.open.values()))
        self.known |= partitions

    def _resumed(self, checkpoint: ResponseCheckpoint, tp: TopicPartition, now: float) -> OpenResponse:
        state = self.scorer.resume(prefix=checkpoint.prefix, scored=checkpoint.scored, logits=checkpoint.logits,
                                   text=checkpoint.text, anchor_tok=checkpoint.anchor_tok)
        response = self._checkpointed(checkpoint, tp, now)
        response.state, response.step = state, self.scorer.step_of(state)
        return response

    def _checkpointed(self, checkpoint: ResponseCheckpoint, tp: TopicPartition, now: float) -> OpenResponse:
        """The response a checkpoint describes, without its scorer state."""
        return OpenResponse(
            checkpoint.response_id, tp, ChunkOrder(self.config.max_pending_chunks, next_seq=checkpoint.next_seq),
            now, last_seq=checkpoint.last_seq,
            meta=Meta(checkpoint.tenant, checkpoint.conversation_id, checkpoint.metadata),
            chunks=checkpoint.chunks, bytes=checkpoint.text_bytes,
        )

    def offer(self, item: Item, now: float) -> None:
        chunk = item.body
        rid = chunk.response_id
        if rid in self.closed:
            if self.closed.reason(rid) == "limit":
                self.out.dead_letter(item, "response_limit",
                                     "the response was stopped at its chunk, byte or token limit", "decode")
            else:
                self.out.done(item)  # a late or repeated chunk of a response already judged
            return
        response = self.open.get(rid)
        next_seq = response.order.next_seq if response is not None else 0
        if chunk.seq > next_seq + self.config.max_pending_chunks:
            # Refused before it touches anything: a forged far-ahead seq can neither open nor close a response.
            self.out.dead_letter(item, "seq_out_of_range",
                                 f"seq {chunk.seq} is more than {self.config.max_pending_chunks} ahead of {next_seq}",
                                 "decode")
            return
        if response is None:
            response = self.open[rid] = OpenResponse(rid, item.tp, ChunkOrder(self.config.max_pending_chunks), now)
        status, ready = response.order.offer(chunk.seq, item)
        if status == "duplicate":
            self.out.done(item)
            return
        response.held.append(item)
        response.last_seen = now
        response.chunks += 1
        response.bytes += len(chunk.text.encode())
        if response.chunks > self.config.max_chunks_per_response or response.bytes > self.config.max_response_bytes:
            response.limit = "chunks" if response.chunks > self.config.max_chunks_per_response else "bytes"
            self._close(response, "limit")
            return
        if status in ("overflow", "too_far"):  # unreachable past the seq check above; fail closed all the same
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
                response = work.response
                if self.open.get(response.response_id) is not response:
                    continue  # failed, released or closed meanwhile
                reason = reasons.get(response.response_id)
                if reason is not None:
                    self._close(response, reason)
                elif work.scored:
                    self._checkpoint(response, work.scored)

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
                response, item = work.response, work.chunks.popleft()
                chunk = item.body
                work.scored.append(item)
                if response.state is None:
                    response.state = scored.state
                    response.meta = Meta(chunk.tenant, chunk.conversation_id, chunk.metadata)
                response.step, response.last_seq = step, chunk.seq
                if step.stop_index is not None:
                    reasons[response.response_id] = "threshold"
                elif step.unread:  # text past max_read_tokens: judging it unread would allow what was not read
                    reasons[response.response_id] = "limit"
                    response.limit = "tokens"
                elif chunk.final:
                    reasons[response.response_id] = "final"

    def _expire(self, now: float) -> None:
        timeout = self.config.response_timeout_s
        for response in [r for r in self.open.values() if now - r.last_seen > timeout]:
            if response.response_id not in self.queue:
                self._close(response, "gap" if response.order.pending else "timeout")

    def _fail(self, response: OpenResponse, exc: Exception) -> None:
        log.error("response.inference_failed", response_id=response.response_id, error=repr(exc))
        response.meta = response.meta or self._meta(response)
        held, response.held = response.held, []
        self._close(response, "error")
        for item in held:
            self.out.dead_letter(item, "inference_error", repr(exc), "inference")

    # ---------------------------------------------------------------- checkpoint
    def _checkpoint_message(self, response: OpenResponse, closed: Reason | None = None) -> Message:
        state, meta = response.state, response.meta or self._meta(response)
        checkpoint = ResponseCheckpoint(
            response_id=response.response_id, topic=response.tp.topic, partition=response.tp.partition,
            next_seq=response.order.next_seq, closed=closed, tenant=meta.tenant,
            conversation_id=meta.conversation_id, metadata=meta.metadata, last_seq=response.last_seq,
            chunks=response.chunks, text_bytes=response.bytes, written_at=utcnow(),
            **({} if state is None or closed is not None else {
                "prefix": state.prefix, "scored": state.scored, "logits": state.logits,
                # Once max_read_tokens are scored, the text is never read again.
                "text": "" if self._capped(state) else state.text[state.anchor_char:],
                "anchor_tok": state.anchor_tok}),
        )
        key, body = response.response_id.encode(), checkpoint.to_json()
        return Message(self.settings.topics.response_state, body, key,
                       self.signer.headers("response_state", key, body))

    def _capped(self, state: ResponseState) -> bool:
        return len(state.scored) >= self.scorer.max_tokens

    def _checkpoint(self, response: OpenResponse, scored: list[Item]) -> None:
        """The scored chunks are done once the response's state after them is acknowledged (checkpoints on);
        without checkpoints they stay held until the verdict."""
        if self.state_log is None:
            return
        done = {id(i) for i in scored}
        response.held = [i for i in response.held if id(i) not in done]
        last, others = scored[-1], scored[:-1]

        def acked() -> None:
            for item in others:
                self.out.done(item)

        self.out.publish(last, [self._checkpoint_message(response)], acked)

    # ---------------------------------------------------------------- verdict
    def _forget(self, response: OpenResponse, reason: Reason) -> None:
        self.open.pop(response.response_id, None)
        self.closed.add(response.response_id, reason)
        self.store.pop(response.response_id)
        if response.response_id in self.queue:
            self.queue.remove(response.response_id)

    @staticmethod
    def _meta(response: OpenResponse) -> Meta:
        first = next((i.body for i in response.held if i.body.seq == 0), None) or response.held[0].body
        return Meta(first.tenant, first.conversation_id, first.metadata)

    def _close(self, response: OpenResponse, reason: Reason) -> None:
        self._forget(response, reason)
        step = response.step
        probe = self.scorer.probe
        meta = response.meta or self._meta(response)
        stopped = (step is not None and step.stop_index is not None) or reason in UNSCORED
        p_unsafe = step.p_unsafe if step is not None else 0.0
        verdict = StreamVerdict(
            response_id=response.response_id, conversation_id=meta.conversation_id, tenant=meta.tenant,
            decision="stop" if stopped else "allow", reason=reason,
            token_index=step.stop_index if step is not None else None,
            tokens_scored=step.scored_tokens if step is not None else 0, last_seq=response.last_seq,
            p_unsafe=p_unsafe, threshold=probe.settings.threshold,
            aggregator=probe.settings.aggregator, alpha=probe.settings.alpha, bundle_version=self.bundle_version,
            model_version=self.model_version, decided_at=utcnow(), metadata=meta.metadata,
        )
        key = response.response_id.encode()
        body = verdict.to_json()
        messages = [Message(self.settings.topics.response_verdicts, body, key,
                            [("response_id", key), *self.signer.headers("stream_verdict", key, body)])]
        if reason in UNSCORED:
            alert = Alert(
                alert_id=str(uuid.uuid5(STREAM_ALERT_NAMESPACE, response.response_id)),
                event_id=response.response_id, conversation_id=meta.conversation_id or response.response_id,
                tenant=meta.tenant, severity="critical", source="stream", p_unsafe=p_unsafe,
                bundle_version=self.bundle_version, verdict_decided_at=verdict.decided_at, raised_at=utcnow(),
                metadata={"stream_reason": reason, "last_seq": response.last_seq,
                          **({"limit": response.limit} if response.limit else {})},
            )
            alert_body = alert.to_json()
            messages.append(Message(self.settings.topics.alerts, alert_body, key,
                                    [("alert_id", alert.alert_id.encode()),
                                     *self.signer.headers("alert", key, alert_body)]))
        if self.state_log is not None:
            messages.append(self._checkpoint_message(response, closed=reason))
        log.log(40 if reason in UNSCORED else 20, "response.verdict", response_id=response.response_id,
                decision=verdict.decision, reason=reason, tokens=verdict.tokens_scored, limit=response.limit)
        if not response.held:
            # Every chunk was checkpointed and committed: the verdict is owed to no record in flight (a crash
            # before it is acknowledged leaves the checkpoint open, and the response times out again).
            self.out.publish_detached(messages)
            return
        last, others = response.held[-1], response.held[:-1]

        def acked() -> None:
            # Only now may the response's other chunks count as done: before, a crash must re-read them.
            for item in others:
                self.out.done(item)

        self.out.publish(last, messages, acked)


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
    r = settings.responses
    try:
        scorer = StreamScorer(monitor.extractor, probe, prefix_max_tokens=monitor.max_tokens,
                              stride=r.rolling_stride_tokens, max_tokens=r.max_read_tokens)
    except ValueError as exc:
        raise ConfigError(f"responses: {exc}") from exc
    return scorer_stream(settings, scorer, bundle_version=monitor.bundle.version,
                         model_version=monitor.model_version, metrics=metrics, **clients)


def scorer_stream(settings: WorkerSettings, scorer: StreamScorer, *, bundle_version: str, model_version: str,
                  metrics: ConsumerMetrics | None = None, **clients: object) -> ResponseStream:
    """The service around a given stream scorer (``response_stream`` builds it from the bundle)."""
    metrics = metrics or ConsumerMetrics(prefix="ctd_responses", consumed_name="chunks_in",
                                         consumed_help="Response chunks consumed")
    handler = ResponseHandler(settings, scorer, bundle_version=bundle_version, model_version=model_version,
                              metrics=metrics)
    r = settings.responses
    limits = ServiceLimits.from_config(r, max_event_bytes=r.max_event_bytes)
    limits = dataclasses.replace(limits, max_in_flight_per_partition=r.partition_max_in_flight)
    return Stream(handler, kafka=settings.kafka, group_id=r.group_id, topic=settings.topics.responses,
                  dead_letter_topic=settings.topics.dead_letter, metrics=metrics, limits=limits,
                  **clients)  # type: ignore[arg-type]
