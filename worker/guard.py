"""The guard service: delegated conversations in (expert-review topic), final expert verdicts out.

Each review request is scored by the configured expert backend and answered with a verdict of
``source: "expert"`` on the verdicts topic, which supersedes the probe's verdict for that event id. The
discipline is the worker's (``StreamService``): at-least-once, commit after the broker acknowledged, bad
records to the dead-letter topic. When the expert is down or too slow the batch is retried with backoff
and nothing is committed past it: requests wait in the topic (fetching pauses once ``max_in_flight`` is
reached) and ``ctd_expert_degraded`` is 1, while the probe verdict already published stands.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import orjson
from aiokafka import ConsumerRecord, TopicPartition
from pydantic import ValidationError

from probes.errors import ExpertError, ExpertUnavailable
from probes.experts.base import Expert
from probes.logs import get_logger
from worker.config import GuardSettings
from worker.events import BudgetState, ReviewRequest, Timings, Verdict, utcnow
from worker.metrics import GuardMetrics
from worker.stream import ServiceLimits, StreamService

log = get_logger(__name__)


@dataclass
class Review:
    tp: TopicPartition
    offset: int
    key: bytes | None
    value: bytes
    request: ReviewRequest
    consumed_at: float


class ExpertTimeout(ExpertUnavailable):
    """The expert did not answer a batch within ``guard.expert_timeout_s``."""


class GuardService(StreamService):
    name = "guard"

    def __init__(self, settings: GuardSettings, expert: Expert, metrics: GuardMetrics | None = None, *,
                 serve_http: bool = True) -> None:
        g = settings.guard
        self.metrics = metrics or GuardMetrics()
        super().__init__(
            kafka=settings.kafka, group_id=g.group_id, topic=settings.topics.review,
            dead_letter_topic=settings.topics.dead_letter, metrics=self.metrics,
            limits=ServiceLimits(max_in_flight=g.max_in_flight, max_event_bytes=4 * 1_000_000,
                                 shutdown_deadline_s=g.shutdown_deadline_s, commit_interval_s=g.commit_interval_s,
                                 liveness_max_stall_s=g.liveness_max_stall_s, http_host=g.http_host,
                                 http_port=g.http_port if serve_http else None),
        )
        self.settings = settings
        self.expert = expert
        self._pending: collections.deque[Review] = collections.deque()
        # Local experts run torch: one scoring thread, never the event loop.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ctd-expert")
        self._degraded = False

    @property
    def degraded(self) -> bool:
        return self._degraded

    # ---------------------------------------------------------------- service hooks
    def _busy(self) -> bool:
        # A down expert cannot make progress: the drain does not wait for it, the topic keeps the requests.
        return bool(self._pending) and not self._degraded

    def _waiting_on_purpose(self) -> bool:
        return self._degraded  # the expert is down: requests wait in the topic, restarting us fixes nothing

    async def _stopped(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _accept(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        now = time.monotonic()
        for record in records:
            try:
                request = ReviewRequest.model_validate(orjson.loads(record.value or b""))
            except (orjson.JSONDecodeError, ValidationError) as exc:
                self._dead_letter_record(record, "invalid_review_request", str(exc)[:500], "decode")
                continue
            self._pending.append(Review(TopicPartition(record.topic, record.partition), record.offset, record.key,
                                        record.value or b"", request, now))
        self._wake.set()

    async def _work_loop(self) -> None:
        g = self.settings.guard
        while True:
            if not self._pending:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=0.5)
                except TimeoutError:
                    pass
                continue
            if len(self._pending) < g.max_batch and not self._stopping.is_set():
                oldest = self._pending[0].consumed_at
                wait = oldest + g.max_wait_ms / 1000 - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(min(wait, 0.05))
                    continue
            batch = [self._pending.popleft() for _ in range(min(g.max_batch, len(self._pending)))]
            await self._review(batch)

    # ---------------------------------------------------------------- scoring
    async def _score(self, batch: Sequence[Review]) -> npt.NDArray[np.float64]:
        conversations = [r.request.event.conversation() for r in batch]
        timeout = self.settings.guard.expert_timeout_s
        ascore = getattr(self.expert, "ascore", None)
        try:
            if ascore is not None:  # HTTP backends are async: no thread needed
                return np.asarray(await asyncio.wait_for(ascore(conversations), timeout=timeout), dtype=np.float64)
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._executor, self.expert.score, conversations)
            return np.asarray(await asyncio.wait_for(future, timeout=timeout), dtype=np.float64)
        except TimeoutError as exc:
            raise ExpertTimeout(f"no answer within {timeout}s for {len(batch)} requests") from exc

    async def _review(self, batch: list[Review]) -> None:
        """Score with retries while the expert is down; split and dead-letter requests it cannot score."""
        g = self.settings.guard
        backoff = g.retry_backoff_s
        while True:
            started = time.monotonic()
            try:
                scores = await self._score(batch)
            except ExpertUnavailable as exc:
                kind = "timeout" if isinstance(exc, ExpertTimeout) else "unavailable"
                self.metrics.expert_errors.labels(kind=kind).inc()
                self._set_degraded(True, reason=kind)
                if self._stopping.is_set():
                    return  # left in flight, uncommitted: the next owner scores them
                await self._sleep_unless_stopping(backoff)
                backoff = min(backoff * 2, g.retry_backoff_max_s)
                continue
            except Exception as exc:  # noqa: BLE001 - a request the expert cannot score must not stop the stream
                self.metrics.expert_errors.labels(kind="error").inc()
                await self._split_or_dead_letter(batch, exc)
                return
            break
        self._set_degraded(False)
        elapsed = time.monotonic() - started
        self.metrics.expert_latency.observe(elapsed)
        if len(scores) != len(batch):
            await self._split_or_dead_letter(batch, ExpertError(f"{len(scores)} scores for {len(batch)} requests"))
            return
        for review, score in zip(batch, scores, strict=True):
            self._publish(review, float(score), started=started, scoring_s=elapsed)

    async def _split_or_dead_letter(self, batch: list[Review], exc: Exception) -> None:
        if len(batch) == 1:
            r = batch[0]
            self._dead_letter(r.tp, r.offset, r.key, r.value, "expert_error", repr(exc), "expert")
            return
        log.warning("expert.split_retry", size=len(batch), error=type(exc).__name__)
        half = len(batch) // 2
        await self._review(batch[:half])
        await self._review(batch[half:])

    def _set_degraded(self, degraded: bool, *, reason: str = "") -> None:
        if degraded and not self._degraded:
            self.metrics.degraded_total.inc()
            log.warning("expert.degraded", expert=self.expert.name, reason=reason,
                        waiting=len(self._pending) + self.tracker.in_flight())
        elif not degraded and self._degraded:
            log.info("expert.recovered", expert=self.expert.name)
        self._degraded = degraded
        self.metrics.degraded.set(1 if degraded else 0)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    # ---------------------------------------------------------------- publish
    def _publish(self, review: Review, score: float, *, started: float, scoring_s: float) -> None:
        assert self.producer is not None
        request = review.request
        event = request.event
        decision = "unsafe" if score >= self.settings.guard.unsafe_threshold else "safe"
        waited_s = max(0.0, (utcnow() - request.requested_at).total_seconds() - scoring_s)
        verdict = Verdict(
            event_id=event.event_id, conversation_id=event.conversation_id, tenant=event.tenant,
            p_unsafe=min(1.0, max(0.0, score)), dv=request.dv, delegated=True, decision=decision,
            source="expert", budget=BudgetState(threshold=request.threshold),
            bundle_version=request.bundle_version, model_version=request.model_version or "unknown",
            expert_version=self.expert.name,
            timings=Timings(queue_ms=waited_s * 1000, inference_ms=scoring_s * 1000,
                            total_ms=(time.monotonic() - review.consumed_at) * 1000),
            decided_at=utcnow(), metadata={**event.metadata, "probe_p_unsafe": request.p_unsafe},
        )
        headers = [("event_id", event.event_id.encode()), ("source", b"expert")]
        send = self.producer.send(self.settings.topics.verdicts, verdict.to_json(),
                                  key=event.conversation_id.encode(), headers=headers)
        requested_at = request.requested_at

        def acked() -> None:
            self.metrics.verdicts_out.labels(decision=decision).inc()
            self.metrics.review_latency.observe(max(0.0, (utcnow() - requested_at).total_seconds()))

        self._track_acks(review.tp, review.offset, [send], acked)

