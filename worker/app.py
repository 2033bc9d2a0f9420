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

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from probes.logs import get_logger
from probes.monitor import Monitor
from worker.batcher import BatchLimits, MicroBatcher
from worker.budget import BudgetController
from worker.commits import CommitTracker
from worker.config import WorkerSettings
from worker.deadline import Deadline
from worker.events import (
    BudgetState,
    ConversationEvent,
    DecodeError,
    ReviewRequest,
    Timings,
    Verdict,
    dead_letter,
    decode_event,
    utcnow,
)
from worker.health import HealthServer
from worker.metrics import WorkerMetrics

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


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: MonitorWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.worker.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.worker.on_assigned(set(assigned))


class MonitorWorker:
    def __init__(self, settings: WorkerSettings, monitor: Monitor, metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        self.monitor = monitor
        self.metrics = metrics or WorkerMetrics()
        b = settings.batching
        self.batcher: MicroBatcher[Item] = MicroBatcher(
            BatchLimits(max_batch_tokens=b.max_batch_tokens, max_items=b.max_items, max_wait_s=b.max_wait_ms / 1000,
                        lookahead=b.lookahead)
        )
        self.tracker: CommitTracker[TopicPartition] = CommitTracker()
        # Two threads: one prepares (tokenize, collate) while the other runs torch.
        self._prep = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ctd-prep")
        self._infer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ctd-infer")
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._assigned: set[TopicPartition] = set()
        self._pending_acks: set[asyncio.Task[None]] = set()
        self._inference: asyncio.Task[None] | None = None
        self._recent: collections.deque[bool] = collections.deque(maxlen=1000)
        self._last_progress = time.monotonic()
        self._last_commit = time.monotonic()
        self._commit_lock = asyncio.Lock()
        self.failed = False
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.health: HealthServer | None = None
        self.budget = BudgetController(monitor.rule, settings.budget, self.metrics)
        rule = monitor.rule
        self.metrics.threshold.set(rule.threshold if rule.threshold is not None else float("nan"))
        self.metrics.budget_alpha.set(rule.alpha if rule.alpha is not None else float("nan"))
        self.metrics.no_valid_threshold.set(0 if rule.valid else 1)
        if not rule.valid:
            log.warning("delegation.no_valid_threshold", bundle=monitor.bundle.version, variant=rule.variant)

    # ---------------------------------------------------------------- lifecycle
    def stop(self) -> None:
        """Ask for a graceful drain (SIGTERM handler)."""
        self._stopping.set()
        self._wake.set()

    def ready(self) -> bool:
        return bool(self._assigned) and not self._stopping.is_set()

    def live(self) -> tuple[bool, str]:
        """Alive while polls return and, when work is in flight, commits keep advancing."""
        now = time.monotonic()
        limit = self.settings.worker.liveness_max_stall_s
        poll_age = now - self._last_progress
        commit_age = now - self._last_commit
        if poll_age > limit:
            return False, f"no poll for {poll_age:.1f}s"
        if self.tracker.in_flight() and commit_age > limit:
            return False, f"{self.tracker.in_flight()} events in flight, no commit for {commit_age:.1f}s"
        return True, f"last poll {poll_age:.1f}s ago, last commit {commit_age:.1f}s ago"

    async def run(self) -> None:
        s = self.settings
        common = s.kafka.client_kwargs()
        self.producer = AIOKafkaProducer(
            **common, acks="all", enable_idempotence=True, linger_ms=5, max_request_size=4 * s.worker.max_event_bytes
        )
        self.consumer = AIOKafkaConsumer(
            **common, group_id=s.kafka.group_id, enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=s.kafka.session_timeout_ms, heartbeat_interval_ms=s.kafka.heartbeat_interval_ms,
            max_poll_interval_ms=s.kafka.max_poll_interval_ms, fetch_max_bytes=8 * s.worker.max_event_bytes,
            max_partition_fetch_bytes=2 * s.worker.max_event_bytes,
        )
        self.health = HealthServer(
            host=s.worker.http_host, port=s.worker.http_port, registry=self.metrics.registry, ready=self.ready,
            live=self.live,
        )
        await self.health.start()
        await self.producer.start()
        self.consumer.subscribe([s.topics.input], listener=_Rebalance(self))
        await self.consumer.start()
        log.info("worker.started", topic=s.topics.input, group=s.kafka.group_id, bundle=self.monitor.bundle.version)
        tasks = [
            asyncio.create_task(self._fetch_loop(), name="fetch"),
            asyncio.create_task(self._batch_loop(), name="batch"),
            asyncio.create_task(self._commit_loop(), name="commit"),
        ]
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            crashed = [t for t in done if t is not stopping and not t.cancelled() and t.exception()]
            for task in crashed:
                # A dead loop would leave a zombie that looks alive: stop, and let the supervisor restart us.
                log.error("worker.loop_crashed", loop=task.get_name(), error=repr(task.exception()))
                self.failed = True
        finally:
            stopping.cancel()
            self._stopping.set()
            await self._shutdown(tasks)
        if self.failed:
            raise RuntimeError("a worker loop crashed; see the log")

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        deadline = Deadline(self.settings.worker.shutdown_deadline_s)
        log.info("worker.draining", in_flight=self.tracker.in_flight(), deadline_s=deadline.remaining())
        tasks[0].cancel()  # stop fetching first; batch and commit loops drain what is in hand
        await asyncio.gather(tasks[0], return_exceptions=True)
        try:
            # Keep a share of the deadline for the commit, leaving the group and flushing the producer.
            await asyncio.wait_for(self._drain(tasks[1]), timeout=max(0.1, deadline.remaining() * 0.6))
        except TimeoutError:
            log.warning("worker.drain_timeout", abandoned=self.tracker.in_flight())
        for task in tasks[1:]:
            task.cancel()
        await asyncio.gather(*tasks[1:], return_exceptions=True)
        try:
            await self._commit(deadline)
            assert self.consumer is not None and self.producer is not None
            # Commit before leaving the group: closing the consumer stops heartbeats and triggers the rebalance.
            for step, closing in (("consumer", self.consumer.stop()), ("producer", self.producer.stop())):
                try:
                    await asyncio.wait_for(closing, timeout=max(0.5, deadline.remaining()))
                except TimeoutError:
                    log.warning("worker.stop_timeout", step=step)
        finally:
            if self.health is not None:
                await self.health.stop()
            self._prep.shutdown(wait=False, cancel_futures=True)
            self._infer.shutdown(wait=False, cancel_futures=True)
        log.info("worker.stopped", left_in_flight=self.tracker.in_flight())

    async def _drain(self, batch_loop: asyncio.Task[None]) -> None:
        while (len(self.batcher) and not batch_loop.done()) or self._inference is not None or self._pending_acks:
            self._wake.set()
            await asyncio.sleep(0.01)

    # ---------------------------------------------------------------- rebalance
    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._assigned |= assigned
        self.metrics.rebalances.labels(kind="assigned").inc()
        self.metrics.ready.set(1 if self.ready() else 0)
        log.info("partitions.assigned", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Finish what is in flight for the revoked partitions within the deadline, commit, then let go."""
        self.metrics.rebalances.labels(kind="revoked").inc()
        deadline = Deadline(self.settings.worker.shutdown_deadline_s)
        while any(self.tracker.in_flight(tp) for tp in revoked) and not deadline.expired():
            self._wake.set()
            await asyncio.sleep(0.02)
        await self._commit(deadline, only=revoked)
        abandoned = sum(self.tracker.in_flight(tp) for tp in revoked)
        self.tracker.forget(revoked)
        self._assigned -= revoked
        self.metrics.ready.set(1 if self.ready() else 0)
        log.info("partitions.revoked", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in revoked),
                 abandoned=abandoned)

    # ---------------------------------------------------------------- fetch
    async def _fetch_loop(self) -> None:
        assert self.consumer is not None
        consumer = self.consumer
        limit = self.settings.worker.max_in_flight
        paused = False
        while True:
            if self.tracker.in_flight() >= limit:
                if not paused:
                    consumer.pause(*consumer.assignment())
                    paused = True
                    self.metrics.paused.set(1)
                # The loop is alive while paused; whether work is stuck is the commit age's call.
                self._last_progress = time.monotonic()
                await asyncio.sleep(0.01)
                continue
            if paused:
                consumer.resume(*consumer.assignment())
                paused = False
                self.metrics.paused.set(0)
            batch = await consumer.getmany(timeout_ms=100, max_records=min(500, limit))
            self._last_progress = time.monotonic()
            self.metrics.last_progress.set(time.time())
            records = [r for rs in batch.values() for r in rs]
            if records:
                await self._accept(records)

    async def _accept(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        now = time.monotonic()
        decoded: list[tuple[ConsumerRecord[bytes, bytes], ConversationEvent]] = []
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            if tp not in self._assigned:
                continue  # fetched before a revoke: the partition's new owner reads it from the commit
            if not self.tracker.track(tp, record.offset):
                log.info("partition.reseek", partition=tp.partition, offset=record.offset)
            self.metrics.events_in.inc()
            try:
                event = decode_event(record.value, max_bytes=self.settings.worker.max_event_bytes)
            except DecodeError as exc:
                self._dead_letter(record.topic, record.partition, record.offset, record.key, record.value,
                                  exc.reason, exc.detail, "decode")
                continue
            decoded.append((record, event))
        if not decoded:
            return
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(
            self._prep, lambda: [self.monitor.tokenize(event.conversation()) for _, event in decoded]
        )
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
            batch = self.batcher.next_batch(time.monotonic(), force=self._stopping.is_set())
            if not batch:
                continue
            items = [p.item for p in batch]
            collated = await loop.run_in_executor(self._prep, self.monitor.collate, [i.ids for i in items])
            if self._inference is not None:
                await self._inference  # one batch in torch at a time; this one was collated meanwhile
            self._inference = asyncio.create_task(self._infer_and_publish(items, collated))
            self._inference.add_done_callback(self._inference_done)

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
        for item, outcome in outcomes:
            if outcome is None:
                continue
            self._publish(item, outcome, queue_s=started - item.consumed_at, inference_s=elapsed)

    async def _score_with_split(
        self, items: list[Item], collated: Any, loop: asyncio.AbstractEventLoop
    ) -> list[tuple[Item, Outcome | None]]:
        """Score a batch; on a model error (e.g. OOM) split it in halves, and dead-letter single failures."""
        try:
            scores = await loop.run_in_executor(self._infer, self.monitor.score, collated)
        except Exception as exc:  # noqa: BLE001 - any model failure must not stop the stream
            self.metrics.inference_errors.inc()
            if len(items) == 1:
                item = items[0]
                self._dead_letter(item.tp.topic, item.tp.partition, item.offset, item.key, item.value,
                                  "inference_error", repr(exc), "inference")
                return [(item, None)]
            log.warning("inference.split_retry", size=len(items), error=type(exc).__name__)
            half = len(items) // 2
            out: list[tuple[Item, Outcome | None]] = []
            for part in (items[:half], items[half:]):
                sub = await loop.run_in_executor(self._prep, self.monitor.collate, [i.ids for i in part])
                out.extend(await self._score_with_split(part, sub, loop))
            return out
        decisions = self.budget.decide(scores.signal, [item.tp.partition for item in items])
        return [
            (item, Outcome(float(scores.p_unsafe[i]), None if scores.dv is None else float(scores.dv[i]),
                           float(scores.signal[i]), decisions[i].delegated, decisions[i].budget))
            for i, item in enumerate(items)
        ]

    # ---------------------------------------------------------------- publish
    def _publish(self, item: Item, outcome: Outcome, *, queue_s: float, inference_s: float) -> None:
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
                threshold=budget.threshold, bundle_version=self.monitor.bundle.version, requested_at=utcnow(),
            )
            sends.append(self.producer.send(topics.review, request.to_json(), key=key, headers=headers))
        self._recent.append(outcome.delegated)
        self._track_acks(item.tp, item.offset, sends, item.consumed_at, verdict.decision, outcome.delegated)

    def _dead_letter(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
                     reason: str, error: str, stage: Any) -> None:
        assert self.producer is not None
        record = dead_letter(reason=reason, error=error, topic=topic, partition=partition, offset=offset, key=key,
                             value=value, stage=stage)
        self.metrics.dead_letters.labels(reason=reason).inc()
        log.warning("dead_letter", reason=reason, topic=topic, partition=partition, offset=offset)
        send = self.producer.send(self.settings.topics.dead_letter, record.to_json(), key=key)
        self._track_acks(TopicPartition(topic, partition), offset, [send], None, None, False)

    def _track_acks(self, tp: TopicPartition, offset: int, sends: list[Any], consumed_at: float | None,
                    decision: str | None, delegated: bool) -> None:
        async def wait() -> None:
            try:
                # send() is a coroutine that enqueues the record and returns a future for the broker's ack.
                futures = [await s for s in sends]
                await asyncio.gather(*futures)
            except Exception as exc:  # noqa: BLE001
                # The offset stays in flight: it is never committed, so a restart re-reads it (no loss);
                # liveness turns red once the commit position is stuck behind it.
                self.metrics.publish_errors.inc()
                log.error("publish.failed", error=repr(exc), partition=tp.partition, offset=offset)
                return
            self.tracker.done(tp, offset)
            if decision is not None:
                self.metrics.verdicts_out.labels(decision=decision, source="probe").inc()
                if delegated:
                    self.metrics.delegated.inc()
                if consumed_at is not None:
                    self.metrics.end_to_end_latency.observe(time.monotonic() - consumed_at)
            if self._recent:
                self.metrics.delegation_rate.set(sum(self._recent) / len(self._recent))

        task = asyncio.create_task(wait())
        self._pending_acks.add(task)
        task.add_done_callback(self._pending_acks.discard)

    # ---------------------------------------------------------------- commit
    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.worker.commit_interval_s)
            await self._commit(None)
            await self._update_lag()

    async def _commit(self, deadline: Deadline | None, only: set[TopicPartition] | None = None) -> None:
        assert self.consumer is not None
        async with self._commit_lock:
            offsets = self.tracker.committable()
            if only is not None:
                offsets = {tp: o for tp, o in offsets.items() if tp in only}
            offsets = {tp: o for tp, o in offsets.items() if tp in self._assigned}
            self.metrics.in_flight.set(self.tracker.in_flight())
            if not offsets:
                if not self.tracker.in_flight():
                    self._last_commit = time.monotonic()  # nothing owed: idle is not stuck
                return
            timeout = None if deadline is None else max(0.1, deadline.remaining())
            try:
                await asyncio.wait_for(self.consumer.commit(offsets), timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - a failed commit only means re-delivery later
                log.warning("commit.failed", error=repr(exc))
                return
            self.tracker.mark_committed(offsets)
            self._last_commit = time.monotonic()
            self.metrics.last_progress.set(time.time())

    async def _update_lag(self) -> None:
        assert self.consumer is not None
        for tp in list(self._assigned):
            high = self.consumer.highwater(tp)
            position = self.tracker.position(tp)
            if high is None:
                continue
            committed = position if position is not None else await self.consumer.committed(tp)
            if committed is not None:
                self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(high - committed)
