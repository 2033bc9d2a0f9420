"""Nothing ends un-final: the delegation sweeper, inside the alerter (it already reads every verdict).

A delegated event's probe verdict is not final: the expert's is. When the expert's never comes (the guard
dead-lettered the review request for a bad signature or schema skew, a review was refused for good, the guard's
fail-closed give-up could not be published, the guard has been down past the deadline), the event would stay
un-final and never alert. The sweeper tracks every delegated probe verdict the alerter reads, forgets it when a
final verdict for the event arrives (``expert`` or ``expert_unavailable``), and when ``sweeper.deadline_s`` has
passed since the probe's verdict publishes the final verdict itself: ``source: "expert_unavailable"``, decided by
``guard.unavailable_decision`` (``unsafe``, or the probe's decision), ``metadata.unavailable_reason:
"review_deadline"``. The alerter reads that verdict back like any other and raises a critical alert on it.

The alerter's partitions are the sweeper's: probe and expert verdicts of an event share its Kafka key (the
conversation id), so they land on one partition and one alerter. State is bounded (``sweeper.max_pending``: past
it the oldest is swept early, fail closed) and rebuilt when a partition is assigned, from the last
``sweeper.lookback_s`` of that partition (no consumer group), so a restart or a rebalance loses no deadline; a
partition is swept only once its rebuild is complete. The swept verdicts are signed with the alerter's signing key
(worker/signing.py). An expert verdict that arrives after the sweep supersedes it (the newest verdict decides).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from probes.logs import get_logger
from worker.config import GuardSettings
from worker.decode import InvalidVerdict, decode_verdict
from worker.events import Timings, Verdict, utcnow
from worker.metrics import AlerterMetrics
from worker.signing import SignatureError, Signer

log = get_logger(__name__)
UNAVAILABLE_REASON = "review_deadline"
_REBUILD_RETRY_S = 5.0


@dataclass(slots=True)
class Pending:
    """A delegated event waiting for its final verdict: the probe's verdict (metadata dropped: bounded state)."""

    tp: TopicPartition
    verdict: Verdict
    due: dt.datetime


class DelegationSweeper:
    """Tracks delegated events per owned partition and finalises those whose review missed the deadline."""

    def __init__(self, settings: GuardSettings, metrics: AlerterMetrics, signer: Signer, *,
                 clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.settings = settings
        self.config = settings.sweeper
        self.metrics = metrics
        self.signer = signer
        # The lookback re-reads records the live alerter has judged (and counted) already: not counted twice.
        self._reverifier = dataclasses.replace(signer, refusals=None)
        self.clock = clock
        self._pending: collections.OrderedDict[str, Pending] = collections.OrderedDict()
        self._resolved: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._rebuilt: set[TopicPartition] = set()
        self._owned: set[TopicPartition] = set()
        self._rebuilds: dict[TopicPartition, asyncio.Task[None]] = {}
        self._overflow: list[Pending] = []
        self._producer: AIOKafkaProducer | None = None

    # ---------------------------------------------------------------- state
    def observe(self, tp: TopicPartition, verdict: Verdict) -> None:
        """One verdict of an owned partition, live or replayed (idempotent: replays repeat what was seen)."""
        if not verdict.delegated:
            return
        event_id = verdict.event_id
        if verdict.source != "probe":  # the expert's, or a fail-closed one: final
            if self._pending.pop(event_id, None) is not None:
                self.metrics.sweeper_pending.set(len(self._pending))
            self._resolved[event_id] = None
            self._resolved.move_to_end(event_id)
            while len(self._resolved) > 2 * self.config.max_pending:
                self._resolved.popitem(last=False)
            return
        if event_id in self._resolved or event_id in self._pending:
            return
        lite = verdict.model_copy(update={"metadata": {}, "probe_features": None})
        self._pending[event_id] = Pending(tp, lite, verdict.decided_at + dt.timedelta(seconds=self.config.deadline_s))
        while len(self._pending) > self.config.max_pending:
            _, oldest = self._pending.popitem(last=False)
            self._overflow.append(oldest)  # swept early, fail closed: state stays bounded
        self.metrics.sweeper_pending.set(len(self._pending))

    def due(self) -> list[tuple[Pending, str]]:
        """The entries to finalise now (deadline passed, partition rebuilt), with why; removed from the state."""
        now = self.clock()
        out = [(p, "overflow") for p in self._overflow]
        self._overflow = []
        for event_id, pending in list(self._pending.items()):
            if pending.due <= now and pending.tp in self._rebuilt:
                del self._pending[event_id]
                out.append((pending, "deadline"))
        self.metrics.sweeper_pending.set(len(self._pending))
        return out

    def assigned(self, partitions: Iterable[TopicPartition]) -> None:
        """Rebuild the state of newly owned partitions from the lookback before sweeping them."""
        for tp in partitions:
            self._owned.add(tp)
            if tp not in self._rebuilds or self._rebuilds[tp].done():
                self._rebuilds[tp] = asyncio.create_task(self._rebuild_until_done(tp), name=f"sweeper-rebuild-{tp}")

    def revoked(self, partitions: Iterable[TopicPartition]) -> None:
        """Another alerter owns these now: it rebuilds them; we forget them."""
        gone = set(partitions)
        self._owned -= gone
        self._rebuilt -= gone
        for tp in gone:
            task = self._rebuilds.pop(tp, None)
            if task is not None:
                task.cancel()
        for event_id in [e for e, p in self._pending.items() if p.tp in gone]:
            del self._pending[event_id]
        self.metrics.sweeper_pending.set(len(self._pending))

    # ---------------------------------------------------------------- rebuild
    async def _rebuild_until_done(self, tp: TopicPartition) -> None:
        while tp in self._owned:
            try:
                records = await self._replay(tp)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried: the partition is not swept until it is rebuilt
                log.error("sweeper.rebuild_failed", partition=tp.partition, error=repr(exc))
                await asyncio.sleep(_REBUILD_RETRY_S)
                continue
            if tp in self._owned:
                self._rebuilt.add(tp)
                log.info("sweeper.rebuilt", partition=tp.partition, records=records, pending=len(self._pending))
            return

    async def _replay(self, tp: TopicPartition) -> int:
        """Read ``tp`` from ``lookback_s`` ago to its end now, observing every correctly signed verdict."""
        # read_committed: an exactly-once worker's aborted verdicts were never delivered (and will be again).
        consumer = AIOKafkaConsumer(**self.settings.kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", isolation_level="read_committed")
        await consumer.start()
        try:
            consumer.assign([tp])
            since_ms = int((time.time() - self.config.lookback_s) * 1000)
            start = (await consumer.offsets_for_times({tp: since_ms})).get(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            offset = end if start is None else int(start.offset)
            consumer.seek(tp, offset)
            seen = 0
            while offset < end:
                batch = await consumer.getmany(tp, timeout_ms=500)
                for record in batch.get(tp, []):
                    if record.offset >= end:
                        break
                    seen += 1
                    try:
                        # Judged as when it was written: the lookback reads records up to lookback_s old.
                        verdict = decode_verdict(record, self._reverifier, now=record.timestamp / 1000)
                    except (SignatureError, InvalidVerdict):
                        continue  # the live alerter dead-lettered it already
                    self.observe(tp, verdict)
                offset = await consumer.position(tp)  # past gaps (retention, aborted batches) too
            return seen
        finally:
            await consumer.stop()

    # ---------------------------------------------------------------- sweep
    def final_verdict(self, pending: Pending, now: dt.datetime) -> Verdict:
        """The fail-closed final verdict of an event whose review did not complete in time."""
        probe = pending.verdict
        decision: Literal["unsafe", "safe"] = (
            "unsafe" if self.settings.guard.unavailable_decision == "unsafe" else probe.decision)
        waited_ms = max(0.0, (now - probe.decided_at).total_seconds() * 1000)
        return Verdict(
            event_id=probe.event_id, conversation_id=probe.conversation_id, tenant=probe.tenant,
            p_unsafe=probe.p_unsafe, dv=probe.dv, delegated=True, decision=decision, source="expert_unavailable",
            budget=probe.budget, bundle_version=probe.bundle_version, model_version=probe.model_version,
            expert_version=None, timings=Timings(queue_ms=waited_ms, total_ms=waited_ms), decided_at=now,
            metadata={"unavailable_reason": UNAVAILABLE_REASON, "probe_p_unsafe": probe.p_unsafe}, view=probe.view,
        )

    async def start(self) -> None:
        producer = AIOKafkaProducer(**self.settings.kafka.client_kwargs(), **self.settings.kafka.producer_kwargs())
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer

    async def stop(self) -> None:
        for task in self._rebuilds.values():
            task.cancel()
        await asyncio.gather(*self._rebuilds.values(), return_exceptions=True)
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def run(self) -> None:
        """Check the deadlines every ``check_interval_s``; a verdict that cannot be published is tried again."""
        while self._producer is None:
            try:
                await self.start()
            except Exception as exc:  # noqa: BLE001 - no broker yet: the alerter's own clients wait for it too
                log.error("sweeper.start_failed", error=repr(exc))
                self._producer = None
                await asyncio.sleep(_REBUILD_RETRY_S)
        while True:
            await asyncio.sleep(self.config.check_interval_s)
            try:
                await self.sweep_once()
            except Exception as exc:  # noqa: BLE001 - a failed check is tried again; the state is kept
                log.error("sweeper.check_failed", error=repr(exc))

    async def sweep_once(self) -> int:
        assert self._producer is not None
        swept = 0
        for pending, why in self.due():
            now = self.clock()
            verdict = self.final_verdict(pending, now)
            key = verdict.conversation_id.encode()
            body = verdict.to_json()
            headers = [("event_id", verdict.event_id.encode()), ("source", b"expert_unavailable"),
                       *self.signer.headers("verdict", key, body)]
            try:
                await self._producer.send_and_wait(self.settings.topics.verdicts, body, key=key, headers=headers)
            except Exception as exc:  # noqa: BLE001 - kept and tried again at the next check
                log.error("sweeper.publish_failed", event_id=verdict.event_id, error=repr(exc))
                # Unless it was settled while the send was out: its final verdict came (a fail-closed one now
                # would supersede the expert's), or its partition went to another alerter, which sweeps it.
                if verdict.event_id not in self._resolved and pending.tp in self._owned:
                    self._pending[verdict.event_id] = pending
                    self._pending.move_to_end(verdict.event_id, last=False)
                continue
            swept += 1
            self.metrics.sweeper_swept.labels(reason=why).inc()
            log.error("sweeper.finalised", event_id=verdict.event_id, reason=why, decision=verdict.decision,
                      waited_s=round((now - pending.verdict.decided_at).total_seconds(), 1))
        return swept

    def snapshot(self) -> dict[str, Any]:
        """For tests and logs: how much is tracked."""
        return {"pending": len(self._pending), "rebuilt": len(self._rebuilt), "owned": len(self._owned)}
