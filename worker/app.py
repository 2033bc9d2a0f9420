"""The streaming monitor worker: Kafka in, micro-batched probe inference, verdicts out, at-least-once.

Flow per record: consume → decode (bad input → dead-letter topic) → tokenize (prep thread) → micro-batch
by tokens → collate (prep thread) → forward pass + heads (inference thread, never the event loop) →
verdict (+ review request when delegated) → wait for broker acks → mark done → commit the contiguous
prefix of done offsets per partition. The next batch is collated while the current one runs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition

from probes.logs import get_logger
from probes.monitor import Monitor
from worker.batcher import BatchLimits, MicroBatcher
from worker.budget import BudgetController
from worker.config import WorkerSettings
from worker.events import (
    BudgetState,
    ConversationEvent,
    DecodeError,
    ReviewRequest,
    Timings,
    Verdict,
    decode_event,
    utcnow,
)
from worker.metrics import WorkerMetrics
from worker.service import AckEntry, ServiceLimits, StreamService

log = get_logger(__name__)


@dataclass
class Item:
    """One decoded event on its way through the pipeline."""

    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes
    event: ConversationEvent
    ids: list[int]
    consumed_at: float


@dataclass
class Outcome:
    p_unsafe: float
    dv: float | None
    signal: float
    delegated: bool
    budget: BudgetState


class MonitorWorker(StreamService):
    name = "worker"

    def __init__(self, settings: WorkerSettings, monitor: Monitor, metrics: WorkerMetrics | None = None) -> None:
        w = settings.worker
        self.metrics = metrics or WorkerMetrics()
        super().__init__(
            kafka=settings.kafka, group_id=settings.kafka.group_id, topic=settings.topics.input,
            dead_letter_topic=settings.topics.dead_letter, metrics=self.metrics,
            limits=ServiceLimits(max_in_flight=w.max_in_flight, max_event_bytes=w.max_event_bytes,
                                 shutdown_deadline_s=w.shutdown_deadline_s, commit_interval_s=w.commit_interval_s,
                                 liveness_max_stall_s=w.liveness_max_stall_s, http_host=w.http_host,
                                 http_port=w.http_port),
        )
        self.settings = settings
        self.monitor = monitor
        b = settings.batching
        self.batcher: MicroBatcher[Item] = MicroBatcher(
            BatchLimits(max_batch_tokens=b.max_batch_tokens, max_items=b.max_items, max_wait_s=b.max_wait_ms / 1000,
                        lookahead=b.lookahead)
        )
        # Two threads: one prepares (tokenize, collate) while the other runs torch.
        self._prep = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ctd-prep")
        self._infer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ctd-infer")
        self._inference: asyncio.Task[None] | None = None
        self._recent: collections.deque[bool] = collections.deque(maxlen=1000)
        self._recent_delegated = 0  # delegations among _recent, kept as they come and go
        self._verdicts_out = {d: self.metrics.verdicts_out.labels(decision=d, source="probe") for d in ("safe", "unsafe")}
        self.budget = BudgetController(monitor.rule, settings.budget, self.metrics)
        rule = monitor.rule
        self.metrics.threshold.set(rule.threshold if rule.threshold is not None else float("nan"))
        self.metrics.budget_alpha.set(rule.alpha if rule.alpha is not None else float("nan"))
        self.metrics.no_valid_threshold.set(0 if rule.valid else 1)
        if not rule.valid:
            log.warning("delegation.no_valid_threshold", bundle=monitor.bundle.version, variant=rule.variant)

    # ---------------------------------------------------------------- service hooks
    def _busy(self) -> bool:
        return bool(len(self.batcher)) or self._inference is not None

    async def _work_loop(self) -> None:
        await self._batch_loop()

    async def _stopped(self) -> None:
        self._prep.shutdown(wait=False, cancel_futures=True)
        self._infer.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- decode + tokenize
    async def _accept(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        now = time.monotonic()
        stage = self.metrics.stage_cpu
        decoded: list[tuple[ConsumerRecord[bytes, bytes], ConversationEvent]] = []
        with stage("decode"):
            for record in records:
                try:
                    event = decode_event(record.value, max_bytes=self.settings.worker.max_event_bytes)
                except DecodeError as exc:
                    self._dead_letter_record(record, exc.reason, exc.detail, "decode")
                    continue
                decoded.append((record, event))
        if not decoded:
            return
        loop = asyncio.get_running_loop()

        def tokenize() -> list[list[int]]:
            with stage("render_tokenize"):
                conversations = [event.conversation() for _, event in decoded]
                try:
                    return self.monitor.tokenize_batch(conversations)
                except Exception:  # noqa: BLE001 - one at a time, so only the failing event fails
                    return [self.monitor.tokenize(c) for c in conversations]

        ids = await loop.run_in_executor(self._prep, tokenize)
        with stage("batch_collate"):
            for (record, event), token_ids in zip(decoded, ids, strict=True):
                item = Item(TopicPartition(record.topic, record.partition), record.offset, record.key,
                            record.value or b"", event, token_ids, now)
                self.batcher.add(item, len(token_ids), now)
        self._wake.set()

    # ---------------------------------------------------------------- batch + infer
    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = self.batcher.due_in(time.monotonic())
            if due is None or due > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=due if due is not None else 0.5)
                except TimeoutError:
                    pass
                if not self._stopping.is_set():
                    continue
            with self.metrics.stage_cpu("batch_collate"):
                batch = self.batcher.next_batch(time.monotonic(), force=self._stopping.is_set())
            if not batch:
                continue
            items = [p.item for p in batch]
            collated = await loop.run_in_executor(self._prep, self._collate, [i.ids for i in items])
            if self._inference is not None:
                await self._inference  # one batch in torch at a time; this one was collated meanwhile
            self._inference = asyncio.create_task(self._infer_and_publish(items, collated))
            self._inference.add_done_callback(self._inference_done)

    def _collate(self, ids: list[list[int]]) -> Any:
        with self.metrics.stage_cpu("batch_collate"):
            return self.monitor.collate(ids)

    def _score(self, collated: Any) -> Any:
        with self.metrics.stage_cpu("score"):
            return self.monitor.score(collated)

    def _inference_done(self, task: asyncio.Task[None]) -> None:
        if self._inference is task:
            self._inference = None
        if not task.cancelled() and task.exception() is not None:
            log.error("inference.task_failed", error=repr(task.exception()))

    async def _infer_and_publish(self, items: list[Item], collated: Any) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for item in items:
            self.metrics.queue_latency.observe(started - item.consumed_at)
        self.metrics.batch_size.observe(len(items))
        self.metrics.batch_tokens.observe(collated.padded_tokens)
        outcomes = await self._score_with_split(items, collated, loop)
        elapsed = time.monotonic() - started
        self.metrics.inference_latency.observe(elapsed)
        with self.metrics.stage_cpu("serialise_publish"):
            acks: list[AckEntry] = []
            try:
                for item, outcome in outcomes:
                    if outcome is not None:
                        acks.append(self._publish(item, outcome, queue_s=started - item.consumed_at,
                                                  inference_s=elapsed))
            finally:
                self._track_acks_batch(acks)  # whatever was sent gets its acks tracked, even after a failure

    async def _score_with_split(
        self, items: list[Item], collated: Any, loop: asyncio.AbstractEventLoop
    ) -> list[tuple[Item, Outcome | None]]:
        """Score a batch; on a model error (e.g. OOM) split it in halves, and dead-letter single failures."""
        try:
            scores = await loop.run_in_executor(self._infer, self._score, collated)
        except Exception as exc:  # noqa: BLE001 - any model failure must not stop the stream
            self.metrics.inference_errors.inc()
            if len(items) == 1:
                item = items[0]
                self._dead_letter(item.tp, item.offset, item.key, item.value, "inference_error", repr(exc),
                                  "inference")
                return [(item, None)]
            log.warning("inference.split_retry", size=len(items), error=type(exc).__name__)
            half = len(items) // 2
            out: list[tuple[Item, Outcome | None]] = []
            for part in (items[:half], items[half:]):
                sub = await loop.run_in_executor(self._prep, self.monitor.collate, [i.ids for i in part])
                out.extend(await self._score_with_split(part, sub, loop))
            return out
        with self.metrics.stage_cpu("budget"):
            decisions = self.budget.decide(scores.signal, [item.tp.partition for item in items])
            return [
                (item, Outcome(float(scores.p_unsafe[i]), None if scores.dv is None else float(scores.dv[i]),
                               float(scores.signal[i]), decisions[i].delegated, decisions[i].budget))
                for i, item in enumerate(items)
            ]

    # ---------------------------------------------------------------- publish
    def _publish(self, item: Item, outcome: Outcome, *, queue_s: float, inference_s: float) -> AckEntry:
        assert self.producer is not None
        topics = self.settings.topics
        rule = self.monitor.rule
        event = item.event
        budget = outcome.budget
        verdict = Verdict(
            event_id=event.event_id, conversation_id=event.conversation_id, tenant=event.tenant,
            p_unsafe=outcome.p_unsafe, dv=outcome.dv, delegated=outcome.delegated,
            decision="unsafe" if outcome.p_unsafe >= 0.5 else "safe", source="probe", budget=budget,
            bundle_version=self.monitor.bundle.version, model_version=self.monitor.model_version,
            timings=Timings(queue_ms=queue_s * 1000, inference_ms=inference_s * 1000,
                            total_ms=(time.monotonic() - item.consumed_at) * 1000),
            decided_at=utcnow(), metadata=event.metadata,
        )
        key = event.conversation_id.encode()
        headers = [("event_id", event.event_id.encode())]
        sends = [self.producer.send(topics.verdicts, verdict.to_json(), key=key, headers=headers)]
        if outcome.delegated:
            request = ReviewRequest(
                event=event, p_unsafe=outcome.p_unsafe, dv=outcome.dv,
                reason=f"{rule.signal}={outcome.signal:.4f} > threshold={budget.threshold}",
                threshold=budget.threshold, bundle_version=self.monitor.bundle.version,
                model_version=self.monitor.model_version, requested_at=utcnow(),
            )
            sends.append(self.producer.send(topics.review, request.to_json(), key=key, headers=headers))
        if len(self._recent) == self._recent.maxlen:
            self._recent_delegated -= self._recent[0]
        self._recent.append(outcome.delegated)
        self._recent_delegated += outcome.delegated
        return (item.tp, item.offset, sends,
                lambda: self._acked(item.consumed_at, verdict.decision, outcome.delegated))

    def _acked(self, consumed_at: float, decision: str, delegated: bool) -> None:
        self._verdicts_out[decision].inc()
        if delegated:
            self.metrics.delegated.inc()
        self.metrics.end_to_end_latency.observe(time.monotonic() - consumed_at)
        self.metrics.delegation_rate.set(self._recent_delegated / len(self._recent))
