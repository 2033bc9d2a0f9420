"""Stages 2-4 of an event in the monitor: tokenize → micro-batch → forward pass + heads → verdict.

The monitor handler of the stream core (worker/stream.py): decoded events are tokenized on a prep thread,
micro-batched by tokens (worker/batcher.py), collated while the previous batch runs, scored on the inference
thread (never the event loop), routed by the budget controller (worker/budget.py) and published as a verdict
(plus a review request when delegated or audited). With audits on (``audit.rate`` > 0) the verdict is decided by
the map and cut the guard's audit verdicts refitted (worker/recalibration.py). docs/architecture.md follows one
event through it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from aiokafka import TopicPartition

from probes.activations.batching import split_padded_tokens
from probes.activations.models import DTYPES
from probes.calibration.recalibration import OnlineRecalibrator
from probes.errors import ConfigError
from probes.heads.inference import LinearHead, logit
from probes.logs import get_logger
from probes.runtime.monitor import MIN_SPLIT_SAVING_TOKENS, Monitor, Scores
from worker.audits import AuditSampler, load_audit_secret
from worker.batcher import BatchLimits, MicroBatcher
from worker.breaker import CircuitBreaker
from worker.budget import BudgetController, Delegation
from worker.config import BF16_DECISION_LOGIT_MARGIN, FP32_DECISION_LOGIT_MARGIN, WorkerSettings
from worker.decode import DecodeError, ViewLimits, decode_viewed
from worker.events import (
    ConversationEvent,
    EventView,
    Recalibration,
    ReviewRequest,
    Timings,
    Verdict,
    float32_list,
    utcnow,
)
from worker.fairqueue import FairQueue
from worker.metrics import TenantLabels, WorkerMetrics
from worker.recalibration import RecalibrationFeed, recalibration_info, tenant_cap
from worker.signing import Kind, Signer
from worker.stream import (
    Envelope,
    Message,
    Outputs,
    OutputsSlot,
    Publication,
    Record,
    ServiceLimits,
    Stream,
    split_on_failure,
)
from worker.tenancy import TenantResolver

log = get_logger(__name__)


@dataclass(slots=True)
class Tokenized:
    """A decoded event and its token rows (the body of the monitor's envelope): one row when the conversation
    fits ``max_tokens``, else the usual view plus windows (probes/activations/windows.py); the event scores as its best row."""

    event: ConversationEvent  # its ``tenant`` is the resolved one (worker/tenancy.py)
    rows: list[list[int]]
    claimed: str | None = None  # the payload's tenant where it differs from the resolved one
    size: int = 0  # the record's bytes, held in its tenant's in-flight share until the verdict is handed over
    view: EventView | None = None  # the event was past the size limits: ``event`` is its bounded view

    @property
    def tokens(self) -> int:
        """The item's padded cost for the batcher: its rows as ``collate_by_length`` forwards them, in groups of
        similar lengths each padded to its longest (probes/activations/batching.py ``split_padding``).

        Not the sum of row lengths: the batcher counts a batch as its widest item × items, and each item's cost
        must cover its own padding. Not rows × its longest row either: a windowed item's short window rows are
        forwarded apart from its full ``max_tokens`` view, so that figure (17 × 256 for a long conversation) made
        every windowed event a batch of its own at 8k-token batches: about three times the tokens forwarded.
        """
        if len(self.rows) == 1:
            return len(self.rows[0])
        return split_padded_tokens([len(r) for r in self.rows], min_saving=MIN_SPLIT_SAVING_TOKENS)


Item = Envelope[Tokenized]
# An event's outputs before the batch is signed: each with the record kind its signature binds.
_Unsigned: TypeAlias = "tuple[Item, list[tuple[Kind, Message]], Callable[[], None] | None]"


@dataclass(slots=True)
class Waiting:
    """A decoded event waiting its tenant's turn for tokenization (worker/fairqueue.py)."""

    record: Record
    event: ConversationEvent
    claimed: str | None
    consumed_at: float
    view: EventView | None = None


def decision_logit_margin(setting: float | None, monitor: Monitor) -> float:
    """``worker.decision_logit_margin``, or where unset the default for the dtype the model computes in: bf16 and
    fp16 reductions move a score by up to half a logit between batches, fp32 ones by ~1e-5 (README "Delivery
    guarantees"), so one margin for both would either break the same-decision promise or re-score far too much."""
    if setting is not None:
        return setting
    low_precision = monitor.loaded.dtype in (DTYPES["bf16"], DTYPES["fp16"])
    return BF16_DECISION_LOGIT_MARGIN if low_precision else FP32_DECISION_LOGIT_MARGIN


class MonitorHandler(OutputsSlot):
    """Conversation events in, probe verdicts (and review requests) out."""

    name = "worker"

    def __init__(self, settings: WorkerSettings, monitor: Monitor, metrics: WorkerMetrics) -> None:
        self.metrics = metrics
        self.settings = settings
        self.monitor = monitor
        b = settings.batching
        self.batcher: MicroBatcher[Item] = MicroBatcher(
            BatchLimits(max_batch_tokens=b.max_batch_tokens, max_items=b.max_items, max_wait_s=b.max_wait_ms / 1000,
                        lookahead=b.lookahead)
        )
        t = settings.tenant
        self.tenants = TenantResolver(t, settings.topics.input)
        self.waiting: FairQueue[Waiting] = FairQueue(t.fair_quantum_bytes, t.max_in_flight_bytes)
        self._prep_wake = asyncio.Event()
        # Two threads: one prepares (tokenize, collate) while the other runs torch.
        self._prep = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ctd-prep")
        self._infer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ctd-infer")
        self._inference: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._recent: collections.deque[bool] = collections.deque(maxlen=1000)
        self._recent_delegated = 0  # delegations among _recent, kept as they come and go
        # The tenant every event falls back to and, under tenant.source header, the unverified one: always labelled.
        self.tenant_labels = TenantLabels(settings.metrics, pinned=(t.default, t.unverified))
        self.budget = BudgetController(monitor.rule, settings.budget, self.metrics,
                                       tenant_label=self.tenant_labels.peek)
        self.breaker = CircuitBreaker(settings.worker.breaker_failures, settings.worker.breaker_cooldown_s,
                                      on_change=lambda opened: metrics.circuit_open.set(1 if opened else 0))
        # Signs verdicts and review requests with the worker role's key (the guard's key stays with the guard).
        self.signer = Signer.from_config(settings.signing, "worker", service="worker",
                                         refusals=metrics.signature_refusals, insecure_gauge=metrics.signing_insecure)
        w = settings.worker
        self._view = ViewLimits(max_messages=w.view_max_messages, max_bytes=w.view_max_bytes,
                                head=w.view_head_messages, tail=w.view_tail_messages,
                                message_bytes=w.view_message_bytes)
        rule = monitor.rule
        self.metrics.threshold.set(rule.threshold if rule.threshold is not None else float("nan"))
        self.metrics.budget_alpha.set(rule.alpha if rule.alpha is not None else float("nan"))
        self.metrics.no_valid_threshold.set(0 if rule.valid else 1)
        if not rule.valid:
            log.warning("delegation.no_valid_threshold", bundle=monitor.bundle.version, variant=rule.variant)
        # Audits (a keyed sample of event ids with per-tenant quotas and a budget of their own, apart from delegation
        # and α: worker/audits.py) and the recalibration they feed.
        self.recalibrator: OnlineRecalibrator | None = None
        self.feed: RecalibrationFeed | None = None
        self.audits: AuditSampler | None = None
        # audit.refit=head: every event's pooled activations are kept past the heads (a refit head decides on
        # them, and audited events send them to the guard); otherwise they are dropped as before.
        self._keep_features = settings.audit.enabled and settings.audit.refit == "head"
        self._decision_margin = decision_logit_margin(settings.worker.decision_logit_margin, monitor)
        # Long dialogues' own cut, where the operator chose it (worker.long_dialogue_cut, docs/method.md §6c).
        self._long_cut = monitor.long_cut if settings.worker.long_dialogue_cut else None
        if settings.worker.long_dialogue_cut and self._long_cut is None:
            log.warning("monitor.no_long_cut", bundle=monitor.bundle.version,
                        reason="worker.long_dialogue_cut is on but the bundle certifies no long-conversation cut: "
                        "long dialogues are flagged at the probe's cut")
        if settings.audit.enabled:
            offline = monitor.bundle.manifest.unsafe_cut
            self.audits = AuditSampler(settings, metrics, secret=load_audit_secret(settings))
            self.recalibrator = OnlineRecalibrator(settings.audit, offline_cut=monitor.unsafe_cut,
                                                   offline_valid=offline is not None and offline.valid,
                                                   head=safety_head(monitor) if self._keep_features else None,
                                                   group_cap=tenant_cap(settings.audit))
            self.feed = RecalibrationFeed(settings, self.recalibrator, metrics, secret=self.audits.secret)

    # ---------------------------------------------------------------- handler protocol
    async def start(self, outputs: Outputs) -> None:
        await super().start(outputs)
        self.tenants.log_source()
        if self.feed is not None:
            # Before the group: the first verdicts after a restart are decided with the rebuilt window.
            await self.feed.start()
            await self.feed.catch_up(self.settings.audit.catch_up_timeout_s)

    def busy(self) -> bool:
        return bool(len(self.batcher)) or bool(len(self.waiting)) or self._inference is not None

    def waiting_on_purpose(self) -> bool:
        return False

    def unhealthy(self) -> str | None:
        """Liveness red while the model fails every event (the breaker is open)."""
        return self.breaker.why()

    async def _breaker_pause(self) -> bool:
        """Wait out an open breaker's cooldown (events wait in the topic meanwhile); False when stopping."""
        while (pause := self.breaker.pause_s()) > 0:
            if self.out.stopping:
                return False
            await self.out.sleep(min(pause, 1.0))  # short naps: a shortened cooldown is seen promptly
        return not (self.breaker.opened and self.out.stopping)

    def held_partitions(self) -> set[TopicPartition]:
        """Partitions feeding a tenant with more than its share of the waiting events: the stream pauses them
        (their records stay in Kafka, nothing is dropped) while other tenants' partitions keep flowing."""
        w, t = self.settings.worker, self.settings.tenant
        return {TopicPartition(x.record.topic, x.record.partition)
                for key in self.waiting.crowded(max(1, int(w.max_in_flight * t.max_waiting_share)))
                for x in self.waiting.items(key)}

    def wake(self) -> None:
        self._wake.set()
        self._prep_wake.set()

    async def close(self) -> None:
        self._prep.shutdown(wait=False, cancel_futures=True)
        self._infer.shutdown(wait=False, cancel_futures=True)
        if self.feed is not None:
            await self.feed.stop()

    # ---------------------------------------------------------------- decode + tokenize
    async def accept(self, records: Sequence[Record]) -> None:
        """Decode and resolve each record's tenant; the events then wait their tenant's turn (``_prep_loop``)."""
        now = time.monotonic()
        w = self.settings.worker
        with self.metrics.stage_cpu("decode"):
            for record in records:
                try:
                    viewed = decode_viewed(record.value, view=self._view, max_bytes=w.max_event_bytes,
                                           max_metadata_depth=w.max_metadata_depth,
                                           max_metadata_bytes=w.max_metadata_bytes)
                except DecodeError as exc:
                    self.out.dead_letter(record, exc.reason, exc.detail, "decode")
                    continue
                event = viewed.event
                if viewed.view is not None:
                    self.metrics.bounded_views.inc()
                tenancy = self.tenants.resolve(record.topic, record.headers, event.event_id, event.tenant)
                if tenancy.unverified is not None:
                    self.metrics.tenant_unverified.labels(reason=tenancy.unverified).inc()
                claimed = None
                if tenancy.tenant != event.tenant:
                    # Everything downstream (batcher, budget, verdict, review request, alerts) sees the resolved
                    # tenant; the claim travels only as ``claimed_tenant``.
                    self.metrics.tenant_claims_overridden.inc()
                    claimed = event.tenant
                    event = event.model_copy(update={"tenant": tenancy.tenant})
                self.waiting.put(tenancy.tenant, Waiting(record, event, claimed, now, viewed.view), len(record.value or b""))
        self._prep_wake.set()

    async def _prep_loop(self) -> None:
        """Tokenize waiting events in fair order (deficit round robin on bytes per tenant), only as fast as the
        batcher needs them: what waits, waits here in its tenant's queue, not in arrival order on the prep thread."""
        loop = asyncio.get_running_loop()
        b, t = self.settings.batching, self.settings.tenant
        while True:
            taken = [] if len(self.batcher) >= b.lookahead else self.waiting.take(
                max_items=b.max_items, max_bytes=16 * t.fair_quantum_bytes)
            if not taken:
                self._prep_wake.clear()
                try:
                    await asyncio.wait_for(self._prep_wake.wait(), timeout=0.5)
                except TimeoutError:
                    pass
                continue
            rows = await loop.run_in_executor(self._prep, self._tokenize_all, [x.item.event for x in taken])
            now = time.monotonic()
            with self.metrics.stage_cpu("batch_collate"):
                for x, event_rows in zip(taken, rows, strict=True):
                    waiting = x.item
                    if isinstance(event_rows, Exception):  # a chat template or tokenizer failing on this event alone
                        self.out.dead_letter(waiting.record, "tokenize_error", repr(event_rows), "inference")
                        self.waiting.release(x.key, x.size)
                        continue
                    body = Tokenized(waiting.event, event_rows, waiting.claimed, x.size, waiting.view)
                    self.batcher.add(Envelope.of(waiting.record, body, waiting.consumed_at), body.tokens, now,
                                     key=x.key)
            self._wake.set()

    def _tokenize_all(self, events: Sequence[ConversationEvent]) -> list[list[list[int]] | Exception]:
        """Each event's rows (a conversation cut to ``max_tokens`` is read again in windows, probes/activations/windows.py):
        all events and all their windows in a few calls of the fast tokenizer. Whatever fails, fails for its
        event alone."""
        with self.metrics.stage_cpu("render_tokenize"):
            try:
                return [*self.monitor.tokenize_windows_batch([event.conversation() for event in events])]
            except Exception:  # noqa: BLE001 - one at a time, so only the failing event fails
                return [self._tokenize(event) for event in events]

    def _tokenize(self, event: ConversationEvent) -> list[list[int]] | Exception:
        try:
            return self.monitor.tokenize_windows(event.conversation())
        except Exception as exc:  # noqa: BLE001 - whatever fails here fails for this event alone
            return exc

    def _collate(self, items: Sequence[Item]) -> tuple[Any, list[int]]:
        """All rows of ``items`` in batches of similar lengths, and the item each row belongs to."""
        with self.metrics.stage_cpu("batch_collate"):
            rows = [row for item in items for row in item.body.rows]
            groups = [i for i, item in enumerate(items) for _ in item.body.rows]
            return self.monitor.collate_by_length(rows), groups

    def _score(self, batch: Any, groups: Sequence[int], n: int,
               rows: Sequence[list[list[int]]] | None = None) -> Any:
        with self.metrics.stage_cpu("score"):
            scores = self.monitor.score_grouped(batch, groups, n, keep_features=self._keep_features)
            # One row forwarded on its own is already in the canonical form below.
            return scores if rows is None or len(groups) == 1 else self._canonical_near_cut(scores, rows)

    def _canonical_near_cut(self, scores: Scores, rows: Sequence[list[list[int]]]) -> Scores:
        """Events within ``worker.decision_logit_margin`` of the unsafe cut, scored again from rows forwarded each
        on its own (inference thread).

        Low-precision kernels (bf16) give a row a slightly different score in each batch it lands in (padding and
        batch size change the reductions): an event near the cut could then be answered ``unsafe`` once and
        ``safe`` when redelivered. A row forwarded on its own scores from its own tokens only, so a redelivered
        duplicate gets the same decision; far from the cut the batch's score cannot cross it (README "Delivery
        guarantees" gives the measured spread). Only the event's rows that can decide it are forwarded again: those
        within the margin below the lowest cut or above it. A row further below stays below every cut forwarded
        on its own too, so it decides nothing; a windowed prompt re-forwards a row or two, not all of its windows.
        Under a refit head (audit.refit=head) the head decides on the event's pooled activations: an event within
        the margin of its cut, on its logit, is scored again too, all of its rows.
        """
        margin = self._decision_margin
        if margin <= 0:
            return scores
        cuts = [self.monitor.unsafe_cut]
        if self._long_cut is not None:
            cuts.append(self._long_cut)
        if self.recalibrator is not None and self.recalibrator.state.probe_cut is not None:
            cuts.append(self.recalibrator.state.probe_cut)
        cut_logits = logit(cuts)
        distance = np.min(np.abs(logit(scores.p_unsafe)[:, None] - cut_logits[None, :]), axis=1)
        refit_near = self._near_refit_head_cut(scores.features, len(distance), margin)
        near = np.flatnonzero((distance < margin) | refit_near).tolist()
        if not near:
            return scores
        floor = float(cut_logits.min()) - margin
        starts = np.cumsum([0, *(len(r) for r in rows)])
        row_logits = None if scores.row_p_unsafe is None else logit(scores.row_p_unsafe)
        p_unsafe, signal = scores.p_unsafe.copy(), scores.signal.copy()
        dv = None if scores.dv is None else scores.dv.copy()
        features = None if scores.features is None else scores.features.copy()
        forwarded = 0
        for i in near:
            own = rows[i]
            # Under a refit head every row is forwarded again: the event's features are those of its row with the
            # highest raw P(unsafe), which batch noise can change between rows far below the bundle's cut.
            deciding = own if row_logits is None or refit_near[i] else [
                row for row, z in zip(own, row_logits[starts[i]:starts[i + 1]], strict=True) if z >= floor]
            alone = [self.monitor.score_grouped([self.monitor.collate([row])], [0], 1,
                                                keep_features=self._keep_features) for row in deciding or own]
            forwarded += len(alone)
            best = max(alone, key=lambda a: float(a.p_unsafe[0]))
            p_unsafe[i], signal[i] = best.p_unsafe[0], best.signal[0]
            if dv is not None and best.dv is not None:
                dv[i] = best.dv[0]
            if features is not None and best.features is not None:
                features[i] = best.features[0]
        self.metrics.canonical_rescores.inc(len(near))
        self.metrics.canonical_rows.inc(forwarded)
        return Scores(p_unsafe, dv, signal, features)

    def _near_refit_head_cut(self, features: npt.NDArray[np.float32] | None, n: int,
                             margin: float) -> npt.NDArray[np.bool_]:
        """Which of ``n`` events lie within ``margin`` of a refit head's cut (audit.refit=head, a window cut in
        force), on that head's logit of their pooled activations: there the head, not the raw score, decides."""
        decider = None if self.recalibrator is None else self.recalibrator.head_cut()
        if decider is None or features is None:
            return np.zeros(n, dtype=np.bool_)
        head, cut = decider
        return np.asarray(np.abs(head.logit(features) - logit(cut)) < margin, dtype=np.bool_)

    # ---------------------------------------------------------------- batch + infer
    async def run(self) -> None:
        """The prep and batching loops, and the audit feed beside them: if one dies, all stop (the stream fails)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._prep_loop(), name="prep")
            group.create_task(self._batch_loop(), name="batch")
            if self.feed is not None:
                group.create_task(self.feed.run(), name="recalibration")

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        out = self.out
        while True:
            due = self.batcher.due_in(time.monotonic())
            if due is None or due > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=due if due is not None else 0.5)
                except TimeoutError:
                    pass
                if not out.stopping:
                    continue
            with self.metrics.stage_cpu("batch_collate"):
                batch = self.batcher.next_batch(time.monotonic(), force=out.stopping)
            if not batch:
                continue
            self._prep_wake.set()  # room in the batcher: the next tenant's turn can be tokenized
            items = [p.item for p in batch]
            collated = await loop.run_in_executor(self._prep, self._collate, items)
            if self._inference is not None:
                await self._inference  # one batch in torch at a time; this one was collated meanwhile
            self._inference = asyncio.create_task(self._infer_and_publish(items, collated))
            self._inference.add_done_callback(self._inference_done)

    def _inference_done(self, task: asyncio.Task[None]) -> None:
        if self._inference is task:
            self._inference = None
        if not task.cancelled() and task.exception() is not None:
            log.error("inference.task_failed", error=repr(task.exception()))

    async def _infer_and_publish(self, items: list[Item], collated: tuple[Any, list[int]]) -> None:
        started = time.monotonic()
        for item in items:
            self.metrics.queue_latency.observe(started - item.consumed_at)
        self.metrics.batch_size.observe(len(items))
        self.metrics.batch_tokens.observe(sum(b.padded_tokens for b in collated[0]))
        w = self.settings.worker

        async def attempt(part: list[Item]) -> None:
            loop = asyncio.get_running_loop()
            if not await self._breaker_pause():
                return  # stopping while the breaker is open: left uncommitted, the next owner scores them
            # The whole batch was collated while the previous one ran; halves after a failure are collated anew.
            batch, groups = collated if part is items else await loop.run_in_executor(self._prep, self._collate, part)
            retries = 0
            while True:
                try:
                    scores = await loop.run_in_executor(self._infer, self._score, batch, groups, len(part),
                                                        [item.body.rows for item in part])
                except Exception:
                    self.metrics.inference_errors.inc()  # a model failure (e.g. OOM) must not stop the stream
                    # An event the model fails on alone is retried with backoff (worker.inference_retries) before
                    # its dead letter: a transient failure must not lose its verdict.
                    if len(part) > 1 or retries >= w.inference_retries or self.out.stopping:
                        raise
                    retries += 1
                    await self.out.sleep(w.inference_retry_backoff_s * 2 ** (retries - 1))
                    continue
                break
            self.breaker.success()
            elapsed = time.monotonic() - started
            self.metrics.inference_latency.observe(elapsed)
            with self.metrics.stage_cpu("budget"):
                delegations = self.budget.decide(scores.signal, [item.tp.partition for item in part],
                                                 [item.body.event.tenant for item in part])
            # From here on, whatever fails fails for its event alone: the batch is scored and must not be redone.
            with self.metrics.stage_cpu("serialise_publish"):
                unsigned: list[_Unsigned] = []
                try:
                    verdict_scores, flagged, recalibration = self._probe_verdicts(
                        scores.p_unsafe, scores.features, long=self._long_dialogues(part))
                    for i, (item, delegation) in enumerate(zip(part, delegations, strict=True)):
                        p_unsafe = float(scores.p_unsafe[i])
                        dv = None if scores.dv is None else float(scores.dv[i])
                        if not math.isfinite(p_unsafe) or (dv is not None and not math.isfinite(dv)):
                            self.metrics.inference_errors.inc()
                            self.out.dead_letter(item, "non_finite_score", f"p_unsafe={p_unsafe} dv={dv}",
                                                 "inference")
                            continue
                        try:
                            unsigned.append(self._publish(
                                item, p_unsafe, dv, delegation, score=verdict_scores[i], unsafe=flagged[i],
                                recalibration=recalibration, queue_s=started - item.consumed_at,
                                inference_s=elapsed, features=None if scores.features is None else scores.features[i]))
                        except Exception as exc:  # noqa: BLE001 - e.g. an output that does not serialise
                            self.out.dead_letter(item, "output_error", repr(exc), "inference")
                finally:
                    # What was built is signed (one signature for the batch), sent and tracked, even after a failure.
                    self.out.publish_many(self._signed(unsigned))

        def give_up(item: Item, exc: Exception) -> None:
            if self.breaker.failure():
                log.error("inference.circuit_open", failures=w.breaker_failures,
                          pause_s=round(self.breaker.pause_s(), 1))
            self.out.dead_letter(item, "inference_error", repr(exc), "inference")

        try:
            await split_on_failure(items, attempt, give_up, what="inference")
        finally:
            # Every item is handed over (verdict or dead letter): its bytes leave its tenant's in-flight share.
            for item in items:
                self.waiting.release(item.body.event.tenant, item.body.size)
            self.metrics.tenant_scopes.labels(table="budget").set(len(self.budget.windows))
            self.metrics.tenant_scopes.labels(table="fair_queue").set(self.waiting.keys())
            self.metrics.tenant_scopes.labels(table="metric_labels").set(len(self.tenant_labels.slots))
            self._prep_wake.set()

    # ---------------------------------------------------------------- publish
    def _long_dialogues(self, items: Sequence[Item]) -> list[bool] | None:
        """Which items the long-conversation cut applies to (None: ``worker.long_dialogue_cut`` off)."""
        if self._long_cut is None:
            return None
        return [self._is_long_dialogue(item) for item in items]

    def _is_long_dialogue(self, item: Item) -> bool:
        try:
            return self.monitor.is_long_dialogue(item.body.event.conversation())
        except Exception:  # noqa: BLE001 - an event that cannot say keeps the probe's cut (flagged more, not less)
            return False

    def _probe_verdicts(self, p: npt.NDArray[np.float64], features: npt.NDArray[np.float32] | None = None, *,
                        long: Sequence[bool] | None = None) -> tuple[list[float], list[bool], Recalibration | None]:
        """The verdicts' scores and decisions for a scored batch, once per batch (not per event): the raw score at
        the bundle's cut, or with audits on the calibrated score, flagged at the cut in force (the same decision as
        the raw score at ``probe_cut``; under a refit head its score on ``features``, the events' pooled
        activations), and the state that decided. Read on the event loop, where refits are put in force: one
        state decides the whole batch.

        ``long``: the long dialogues (``_long_dialogues``). Such an event is flagged only if its raw score also
        reaches the bundle's long-conversation cut (probes/evaluation/long_cut.py): the best of up to 17 views
        crosses a cut certified on single views far more often than ε."""
        recal = self.recalibrator
        if recal is None:
            scores, flags, info = p.tolist(), p >= self.monitor.unsafe_cut, None
        else:
            scores = np.clip(recal.calibrated(p, features), 0.0, 1.0).tolist()
            flags, info = recal.flags(p, features), recalibration_info(recal)
        if self._long_cut is not None and long is not None:
            flags = flags & ((p >= self._long_cut) | ~np.asarray(long, dtype=bool))
        return scores, flags.tolist(), info

    def _publish(self, item: Item, p_unsafe: float, dv: float | None, delegation: Delegation, *, score: float,
                 unsafe: bool, recalibration: Recalibration | None, queue_s: float,
                 inference_s: float, features: npt.NDArray[np.float32] | None = None) -> _Unsigned:
        """``p_unsafe``: the probe's raw score; ``score`` and ``unsafe``: the verdict's (``_probe_verdicts``);
        ``features``: the pooled activations behind ``p_unsafe`` (audit.refit=head only), sent with an audit."""
        topics = self.settings.topics
        event = item.body.event
        audited = self.audits is not None and self.audits.select(event.event_id, event.tenant)
        raw = None if recalibration is None else p_unsafe
        verdict = Verdict(
            event_id=event.event_id, conversation_id=event.conversation_id, tenant=event.tenant,
            p_unsafe=score, dv=dv, delegated=delegation.delegated,
            decision="unsafe" if unsafe else "safe", source="probe",
            budget=delegation.budget,
            bundle_version=self.monitor.bundle.version, model_version=self.monitor.model_version,
            timings=Timings(queue_ms=queue_s * 1000, inference_ms=inference_s * 1000,
                            total_ms=(time.monotonic() - item.consumed_at) * 1000),
            decided_at=utcnow(), metadata=event.metadata, audit=audited, probe_p_unsafe=raw,
            recalibration=recalibration, view=item.body.view, claimed_tenant=item.body.claimed,
        )
        key = event.conversation_id.encode()
        headers = [("event_id", event.event_id.encode())]
        body = verdict.to_json()
        messages: list[tuple[Kind, Message]] = [("verdict", Message(topics.verdicts, body, key, headers))]
        if delegation.delegated or audited:
            # An audit is not a delegation: it spends no budget, and the probe's verdict above stays final.
            request = ReviewRequest(
                event=event, p_unsafe=p_unsafe, dv=dv, reason=delegation.reason if delegation.delegated else "audit",
                threshold=delegation.budget.threshold, budget=delegation.budget,
                bundle_version=self.monitor.bundle.version,
                model_version=self.monitor.model_version, requested_at=utcnow(),
                delegated=delegation.delegated, audit=audited,
                probe_features=float32_list(features) if audited and features is not None else None,
                view=item.body.view, probe_decision=verdict.decision,
            )
            review = request.to_json()
            messages.append(("review_request", Message(topics.review, review, key, headers)))
        if len(self._recent) == self._recent.maxlen:
            self._recent_delegated -= self._recent[0]
        self._recent.append(delegation.delegated)
        self._recent_delegated += delegation.delegated
        return item, messages, lambda: self._acked(item.consumed_at, event.tenant, verdict.decision,
                                                   delegation.delegated, audited)

    def _signed(self, unsigned: Sequence[_Unsigned]) -> list[Publication]:
        """The batch's outputs with their signature headers: one Ed25519 signature over all of them
        (worker/signing.py). Should that fail, each event is signed alone and only one that still fails is
        dead-lettered: an event fails for itself, never for its batch."""
        try:
            return self._sign_together(unsigned)
        except Exception:  # noqa: BLE001 - retried event by event, so only the event that fails is lost to it
            return self._sign_alone(unsigned)

    def _sign_alone(self, unsigned: Sequence[_Unsigned]) -> list[Publication]:
        signed: list[Publication] = []
        for one in unsigned:
            try:
                signed.extend(self._sign_together([one]))
            except Exception as exc:  # noqa: BLE001 - e.g. an output that does not serialise
                self.out.dead_letter(one[0], "output_error", repr(exc), "inference")
        return signed

    def _sign_together(self, unsigned: Sequence[_Unsigned]) -> list[Publication]:
        signatures = iter(self.signer.headers_many([(kind, m.key, m.value) for _, outputs, _ in unsigned
                                                    for kind, m in outputs]))
        return [(item, [m._replace(headers=[*(m.headers or ()), *next(signatures)]) for _, m in outputs], on_acked)
                for item, outputs, on_acked in unsigned]

    def _acked(self, consumed_at: float, tenant: str, decision: str, delegated: bool, audited: bool) -> None:
        self.tenant_labels.counter(self.metrics.verdicts_out, tenant, decision=decision, source="probe").inc()
        if delegated:
            self.metrics.delegated.inc()
        if audited:
            self.metrics.audits_sent.inc()
        self.metrics.end_to_end_latency.observe(time.monotonic() - consumed_at)
        self.metrics.delegation_rate.set(self._recent_delegated / len(self._recent))


MonitorStream = Stream[MonitorHandler]


def safety_head(monitor: Monitor) -> LinearHead:
    """The bundle's safety head, which audit.refit=head refits: only a linear head can be (a config error else)."""
    head = monitor.bundle.heads.get("safety")
    if not isinstance(head, LinearHead):
        raise ConfigError(f"audit.refit=head refits a linear safety head; bundle {monitor.bundle.version} has "
                          f"{type(head).__name__}: use audit.refit=platt")
    return head


def monitor_stream(settings: WorkerSettings, monitor: Monitor, metrics: WorkerMetrics | None = None) -> MonitorStream:
    """The monitor worker: the input topic through ``MonitorHandler`` in the worker's consumer group."""
    metrics = metrics or WorkerMetrics()
    w = settings.worker
    handler = MonitorHandler(settings, monitor, metrics)
    return Stream(handler, kafka=settings.kafka, group_id=settings.kafka.group_id,
                  topic=settings.topics.input, dead_letter_topic=settings.topics.dead_letter, metrics=metrics,
                  limits=ServiceLimits.from_config(w, max_event_bytes=w.max_event_bytes),
                  pattern=handler.tenants.pattern, metadata_max_age_ms=settings.tenant.topic_refresh_ms,
                  processing=settings.processing)
