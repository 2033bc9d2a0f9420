"""The guard service: review requests in (expert-review topic), final expert verdicts out.

The guard handler of the stream core (worker/stream.py). Each review request is scored by the configured
expert backend and answered with a verdict of ``source: "expert"``, which supersedes the probe's verdict for
that event id. When the expert is down or too slow the batch is retried with backoff and nothing is committed
past it (docs/architecture.md, "When the expert is down").

Fail closed: a timeout splits a batch like an error does, and a request the expert cannot score for good (an
error on it alone, e.g. a context-length 4xx, or ``guard.max_expert_attempts`` timeouts on it alone) still gets
a final verdict, ``source: "expert_unavailable"``, decided by ``guard.unavailable_decision`` (default: unsafe,
so the alerter raises it). Padding a conversation until the expert chokes on it must not take it out of alerting.
Review requests must carry the worker role's signature, fresh (worker/signing.py); the guard signs its verdicts
with the guard role's key, which no worker holds.

Audits: a request may be an audit (``audit``: in the worker's audit sample) rather than, or besides, a delegation.
Its verdict carries ``audit`` and the probe's raw score (``probe_p_unsafe``) and the header ``audit``, so the
workers' recalibration feeds (worker/recalibration.py) find it; when the request was not delegated the verdict is
a label, not a final decision (``delegated`` false: the probe's verdict on that event stands, the alerter skips it).
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import orjson
from aiokafka import TopicPartition

from probes.config import ExpertRead
from probes.conversation import Conversation, is_long_dialogue
from probes.errors import ConfigError, ExpertError, ExpertUnavailable
from probes.experts.base import Expert
from probes.experts.dialogue_read import dialogue_views, most_unsafe
from probes.heads.inference import logit
from probes.logs import get_logger
from probes.runtime.bundle import read_manifest
from probes.runtime.manifest import DEFAULT_UNSAFE_CUT
from worker.breaker import CircuitBreaker
from worker.config import GuardSettings
from worker.events import (
    AUDIT_HEADER,
    MAX_EVENT_BYTES,
    BudgetState,
    ReviewRequest,
    Timings,
    Verdict,
    utcnow,
)
from worker.lanes import Lanes
from worker.metrics import GuardMetrics
from worker.signing import WORKER, SignatureError, Signer
from worker.stream import (
    Envelope,
    Message,
    OutputsSlot,
    Record,
    ServiceLimits,
    Stream,
    split_on_failure,
)

log = get_logger(__name__)


Review = Envelope[ReviewRequest]
# A review request embeds the whole event plus the probe's scores.
MAX_REQUEST_BYTES = 4 * MAX_EVENT_BYTES


class ExpertTimeout(ExpertUnavailable):
    """The expert did not answer a batch within ``guard.expert_timeout_s``."""


def expert_unsafe_cut(settings: GuardSettings, expert_name: str) -> float:
    """The expert's unsafe cut: ``guard.unsafe_threshold`` when set; else the cut ``calibrate`` certified for this
    expert in ``guard.bundle``; else the default 0.5 (logged, since nothing bounds its benign flag rate)."""
    g = settings.guard
    if g.unsafe_threshold is not None:
        log.info("guard.unsafe_cut", cut=g.unsafe_threshold, source="setting")
        return g.unsafe_threshold
    calibrated = read_manifest(g.bundle).expert_cut(expert_name) if g.bundle is not None else None
    if calibrated is None:
        log.warning("guard.uncalibrated_unsafe_cut", cut=DEFAULT_UNSAFE_CUT, expert=expert_name,
                    reason="no guard.bundle" if g.bundle is None else "the bundle has no cut for this expert")
        return DEFAULT_UNSAFE_CUT
    (log.info if calibrated.valid else log.warning)(
        "guard.unsafe_cut", cut=calibrated.cut, source="bundle", valid=calibrated.valid, epsilon=calibrated.epsilon,
        delta=calibrated.delta)
    return calibrated.cut


@dataclass(frozen=True)
class LongDialogueCut:
    """The expert's cut for long dialogues (``is_long_dialogue`` at ``min_chars``), with the rule and the reading
    (probes/experts/dialogue_read.py) it was certified under."""

    cut: float
    min_chars: int
    read: ExpertRead = "whole"


def expert_long_cut(settings: GuardSettings, expert_name: str, unsafe_cut: float) -> LongDialogueCut | None:
    """The long cut ``calibrate`` certified for this expert in ``guard.bundle``, never below ``unsafe_cut`` (a long
    dialogue is flagged only where it would be if short, too), where ``guard.long_dialogue_cut`` applies it: true
    refuses to start without one (the option promises a bound no cut gives); unset applies it only where it reads the
    user turns too (probes/experts/dialogue_read.py), the reading measured better than none on both counts; false:
    None."""
    g = settings.guard
    if g.long_dialogue_cut is False:
        return None
    long = read_manifest(g.bundle).expert_long_cut(expert_name) if g.bundle is not None else None
    if long is None or (g.long_dialogue_cut is None and long.expert_read == "whole"):
        if g.long_dialogue_cut:
            raise ConfigError(f"guard.long_dialogue_cut: guard.bundle holds no certified long-conversation cut for "
                              f"{expert_name}: run `ctd-monitor calibrate` on it, or turn the option off")
        log.warning("guard.long_dialogue_cut_off", expert=expert_name,
                    reason="no certified long-conversation cut for this expert" if long is None
                    else "its long cut reads dialogues whole: set guard.long_dialogue_cut to apply it",
                    consequence="long dialogues are read whole and decided at the expert's cut")
        return None
    min_chars = long.windows.get("dialogue_chars")
    if not isinstance(min_chars, int) or isinstance(min_chars, bool) or min_chars < 0:
        raise ConfigError(f"guard.long_dialogue_cut: the long-conversation cut in guard.bundle records no valid "
                          f"windows.dialogue_chars (the rule it was certified under): {min_chars!r}")
    rule = LongDialogueCut(cut=max(long.cut.cut, unsafe_cut), min_chars=min_chars, read=long.expert_read)
    log.info("guard.long_dialogue_cut", cut=rule.cut, certified=long.cut.cut, min_chars=rule.min_chars,
             read=rule.read, epsilon=long.cut.epsilon, delta=long.cut.delta, n=long.cut.n)
    return rule


def probe_unsafe_cut(settings: GuardSettings) -> float:
    """The probe's unsafe cut in ``guard.bundle``, at which ``unavailable_decision: probe`` takes the probe's decision
    on the raw score a review request carries: the cut the probe's own verdict was decided at (before any online
    recalibration), not 0.5, which is another decision wherever the cut was calibrated. 0.5 without a bundle."""
    bundle = settings.guard.bundle
    return read_manifest(bundle).probe_cut if bundle is not None else DEFAULT_UNSAFE_CUT


def unavailable_decision(settings: GuardSettings, request: ReviewRequest, probe_cut: float
                         ) -> Literal["unsafe", "safe"]:
    """The final decision on a request the expert could not score: unsafe (fail closed), or the probe's own: the
    decision its verdict carried (online recalibration included, as the sweeper answers), else its raw score at
    ``probe_cut`` (requests from workers before ``probe_decision``)."""
    if settings.guard.unavailable_decision == "unsafe":
        return "unsafe"
    if request.probe_decision is not None:
        return request.probe_decision
    return "unsafe" if request.p_unsafe >= probe_cut else "safe"


class GuardHandler(OutputsSlot):
    """Review requests in, expert verdicts out."""

    name = "guard"

    def __init__(self, settings: GuardSettings, expert: Expert, metrics: GuardMetrics) -> None:
        self.metrics = metrics
        self.settings = settings
        self.expert = expert
        self.unsafe_cut = expert_unsafe_cut(settings, expert.name)
        self.long_cut = expert_long_cut(settings, expert.name, self.unsafe_cut)
        self.probe_cut = probe_unsafe_cut(settings)
        self._pending: collections.deque[Review] = collections.deque()
        g = settings.guard
        # Local experts run torch: one scoring thread at a time, never the event loop, and a call that times out
        # is left behind on its own thread so the next call (a split half) does not queue behind it.
        self.lanes = Lanes("ctd-expert", max_abandoned=g.max_abandoned_calls)
        self.breaker = CircuitBreaker(g.breaker_failures, g.breaker_cooldown_s,
                                      on_change=lambda opened: metrics.circuit_open.set(1 if opened else 0))
        self._degraded = False
        self._wake = asyncio.Event()
        # Signs expert verdicts with the guard's key; accepts review requests from the worker role only.
        self.signer = Signer.from_config(settings.signing, "guard", verifies=WORKER, service="guard",
                                         refusals=metrics.signature_refusals,
                                         insecure_gauge=metrics.signing_insecure)

    @property
    def degraded(self) -> bool:
        return self._degraded

    # ---------------------------------------------------------------- handler protocol
    def busy(self) -> bool:
        # A down expert cannot make progress: the drain does not wait for it, the topic keeps the requests.
        return bool(self._pending) and not self._degraded

    def waiting_on_purpose(self) -> bool:
        return self._degraded  # the expert is down: requests wait in the topic, restarting us fixes nothing

    def unhealthy(self) -> str | None:
        """Liveness red: the model fails every input (breaker open) or calls are wedged past their timeout."""
        return self.breaker.why() or self.lanes.stuck()

    def wake(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        self.lanes.close()

    async def accept(self, records: Sequence[Record]) -> None:
        now = time.monotonic()
        for record in records:
            try:
                self.signer.verify_record("review_request", record, roles=WORKER)
            except SignatureError as exc:
                self.out.dead_letter(record, "bad_signature", str(exc), "decode")
                continue
            try:
                request = ReviewRequest.model_validate(orjson.loads(record.value or b""))
            except Exception as exc:  # noqa: BLE001 - whatever a body makes the parser raise fails for it alone
                self.out.dead_letter(record, "invalid_review_request", f"{type(exc).__name__}: {exc}"[:500],
                                     "decode")
                continue
            self._pending.append(Envelope.of(record, request, now))
        self._wake.set()

    def revoked(self, partitions: set[TopicPartition]) -> None:
        """Drop queued requests of partitions this guard no longer owns: their new owner reviews them."""
        before = len(self._pending)
        self._pending = collections.deque(r for r in self._pending if r.tp not in partitions)
        if len(self._pending) != before:
            log.info("guard.pruned_revoked", dropped=before - len(self._pending))

    async def run(self) -> None:
        g = self.settings.guard
        out = self.out
        while True:
            if not self._pending:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=0.5)
                except TimeoutError:
                    pass
                continue
            if len(self._pending) < g.max_batch and not out.stopping:
                oldest = self._pending[0].consumed_at
                wait = oldest + g.max_wait_ms / 1000 - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(min(wait, 0.05))
                    continue
            batch = [self._pending.popleft() for _ in range(min(g.max_batch, len(self._pending)))]
            await split_on_failure(batch, self._review, self._give_up, what="expert")

    # ---------------------------------------------------------------- scoring
    async def _score(self, batch: Sequence[Review]) -> tuple[npt.NDArray[np.float64], list[float]]:
        """The expert's score of each request and the cut it is judged at, long dialogues read as their cut was
        certified (one expert call; whether a request is a long dialogue is decided here, once)."""
        conversations = [r.body.event.conversation() for r in batch]
        long = self.long_cut
        if long is None:
            return await self._score_views(conversations), [self.unsafe_cut] * len(batch)
        is_long = [is_long_dialogue(c, long.min_chars) for c in conversations]
        cuts = [long.cut if flag else self.unsafe_cut for flag in is_long]
        if long.read == "whole":
            return await self._score_views(conversations), cuts
        views, owners = dialogue_views(conversations, is_long)
        return most_unsafe(await self._score_views(views), owners, len(conversations)), cuts

    async def _score_views(self, conversations: Sequence[Conversation]) -> npt.NDArray[np.float64]:
        timeout = self.settings.guard.expert_timeout_s
        ascore = getattr(self.expert, "ascore", None)
        try:
            if ascore is not None:  # HTTP backends are async: no thread needed
                return np.asarray(await asyncio.wait_for(ascore(conversations), timeout=timeout), dtype=np.float64)
            scores = await self.lanes.call(timeout, self.expert.score, conversations)
            self.metrics.abandoned_calls.set(self.lanes.abandoned_running())
            return np.asarray(scores, dtype=np.float64)
        except TimeoutError as exc:
            self.metrics.abandoned_calls.set(self.lanes.abandoned_running())
            raise ExpertTimeout(f"no answer within {timeout}s for {len(conversations)} conversations") from exc

    async def _review(self, batch: list[Review]) -> None:
        """Score with retries while the expert is down; raise when it cannot score these requests."""
        g = self.settings.guard
        if not await self._breaker_pause():
            return  # stopping while the breaker is open: left in flight, uncommitted, for the next owner
        backoff = g.retry_backoff_s
        timeouts = 0
        errors = 0
        while True:
            started = time.monotonic()
            try:
                scores, cuts = await self._score(batch)
            except ExpertUnavailable as exc:
                kind = "timeout" if isinstance(exc, ExpertTimeout) else "unavailable"
                self.metrics.expert_errors.labels(kind=kind).inc()
                if isinstance(exc, ExpertTimeout):
                    timeouts += 1
                    # A batch that times out may hold one request the expert chokes on: split it like an error.
                    # One request alone that keeps timing out is given up (fail closed), never waited on forever.
                    if len(batch) > 1 or timeouts >= g.max_expert_attempts:
                        raise
                self._set_degraded(True, reason=kind)
                if self.out.stopping:
                    return  # left in flight, uncommitted: the next owner scores them
                await self.out.sleep(backoff)
                backoff = min(backoff * 2, g.retry_backoff_max_s)
                continue
            except Exception:
                self.metrics.expert_errors.labels(kind="error").inc()
                # One request alone that fails is retried (guard.inference_retries, with backoff) before it is
                # given up as expert_unavailable: a transient model error must not become a critical verdict.
                if len(batch) > 1 or errors >= g.inference_retries or self.out.stopping:
                    raise
                errors += 1
                await self.out.sleep(min(g.retry_backoff_s * 2 ** (errors - 1), g.retry_backoff_max_s))
                continue
            break
        self._set_degraded(False)
        if len(scores) != len(batch):
            raise ExpertError(f"{len(scores)} scores for {len(batch)} requests")
        bad = [r for r, score in zip(batch, scores, strict=True) if not math.isfinite(float(score))]
        if bad and len(batch) > 1:
            raise ExpertError(f"{len(bad)} non-finite scores in a batch of {len(batch)}")  # split: find them
        if bad:
            raise ExpertError(f"non-finite expert score {float(scores[0])}")
        self.breaker.success()
        final = await self._canonical_near_cut(batch, scores, cuts)
        # After the re-scores: a request scored again alone waited for them, and its verdict says so.
        elapsed = time.monotonic() - started
        self.metrics.expert_latency.observe(elapsed)
        for review, score, cut in zip(batch, final, cuts, strict=True):
            self._publish(review, float(score), "unsafe" if score >= cut else "safe", started=started,
                          scoring_s=elapsed)

    async def _canonical_near_cut(self, batch: Sequence[Review], scores: npt.NDArray[np.float64],
                                  cuts: Sequence[float]) -> npt.NDArray[np.float64]:
        """Requests scored within ``guard.decision_logit_margin`` of their cut, scored again in a batch of their own.

        A local expert in low precision scores a request slightly differently in each batch (padding and batch size
        change the reductions), so a redelivered request near the cut could be decided otherwise; scored alone, its
        score depends on its own text only (the worker does the same for its verdicts). An error here fails the
        batch like any expert error: it is split, and a request alone needs no second score.
        """
        margin = self.settings.guard.decision_logit_margin
        if margin <= 0 or len(batch) == 1 or getattr(self.expert, "ascore", None) is not None:
            return scores
        near = np.flatnonzero(np.abs(logit(scores) - logit(cuts)) < margin).tolist()
        if not near:
            return scores
        out = scores.copy()
        for i in near:
            alone, _ = await self._score([batch[i]])
            if len(alone) != 1 or not math.isfinite(float(alone[0])):
                raise ExpertError(f"re-scored alone, the expert answered {alone!r}")
            out[i] = alone[0]
        self.metrics.canonical_rescores.inc(len(near))
        return out

    def _give_up(self, review: Review, exc: Exception) -> None:
        """The expert cannot score this request, ever: answer it anyway (fail closed) rather than drop it."""
        request = review.body
        g = self.settings.guard
        if self.breaker.failure():
            log.error("expert.circuit_open", expert=self.expert.name, failures=g.breaker_failures,
                      pause_s=round(self.breaker.pause_s(), 1))
        decision = unavailable_decision(self.settings, request, self.probe_cut)
        self.metrics.expert_errors.labels(kind="given_up").inc()
        # The error's type only: an expert's error text may quote the conversation (an HTTP error body echoing the
        # prompt, probes/experts/openai_compatible.py), and conversation text is never logged.
        log.error("expert.given_up", expert=self.expert.name, event_id=request.event.event_id,
                  error=type(exc).__name__, decision=decision)
        try:
            self._publish(review, request.p_unsafe, decision, started=time.monotonic(), scoring_s=0.0,
                          source="expert_unavailable")
        except Exception as publish_exc:  # noqa: BLE001 - not even that: keep the request for people
            self.out.dead_letter(review, "expert_error", f"{exc!r}; then {publish_exc!r}", "expert")

    async def _breaker_pause(self) -> bool:
        """Wait out an open breaker's cooldown (requests wait in the topic meanwhile); False when stopping."""
        while (pause := self.breaker.pause_s()) > 0:
            if self.out.stopping:
                return False
            self._set_degraded(True, reason="circuit_open")
            await self.out.sleep(min(pause, 1.0))  # short naps: a shortened cooldown is seen promptly
        return not (self.breaker.opened and self.out.stopping)

    def _set_degraded(self, degraded: bool, *, reason: str = "") -> None:
        if degraded and not self._degraded:
            self.metrics.degraded_total.inc()
            log.warning("expert.degraded", expert=self.expert.name, reason=reason,
                        waiting=len(self._pending))
        elif not degraded and self._degraded:
            log.info("expert.recovered", expert=self.expert.name)
        self._degraded = degraded
        self.metrics.degraded.set(1 if degraded else 0)

    # ---------------------------------------------------------------- publish
    def _publish(self, review: Review, score: float, decision: Literal["unsafe", "safe"], *, started: float,
                 scoring_s: float, source: Literal["expert", "expert_unavailable"] = "expert") -> None:
        request = review.body
        event = request.event
        if not math.isfinite(score):
            raise ExpertError(f"non-finite expert score {score}")
        waited_s = max(0.0, (utcnow() - request.requested_at).total_seconds() - scoring_s)
        verdict = Verdict(
            event_id=event.event_id, conversation_id=event.conversation_id, tenant=event.tenant,
            p_unsafe=min(1.0, max(0.0, score)), dv=request.dv, delegated=request.delegated, decision=decision,
            source=source, budget=request.budget or BudgetState(threshold=request.threshold),
            bundle_version=request.bundle_version, model_version=request.model_version or "unknown",
            expert_version=self.expert.name,
            timings=Timings(queue_ms=waited_s * 1000, inference_ms=scoring_s * 1000,
                            total_ms=(time.monotonic() - review.consumed_at) * 1000),
            decided_at=utcnow(), metadata={**event.metadata, "probe_p_unsafe": request.p_unsafe},
            audit=request.audit, probe_p_unsafe=min(1.0, max(0.0, request.p_unsafe)) if request.audit else None,
            # the workers' refit head learns from it (audit.refit=head); a delegation's verdict does not need it
            probe_features=request.probe_features if request.audit else None,
            view=request.view,
        )
        key = event.conversation_id.encode()
        body = verdict.to_json()
        headers = [("event_id", event.event_id.encode()), ("source", source.encode()),
                   *([(AUDIT_HEADER, b"1")] if request.audit else []), *self.signer.headers("verdict", key, body)]
        message = Message(self.settings.topics.verdicts, body, key, headers)
        requested_at = request.requested_at

        def acked() -> None:
            self.metrics.verdicts_out.labels(decision=decision).inc()
            if request.audit:
                self.metrics.audit_verdicts_out.inc()
            self.metrics.review_latency.observe(max(0.0, (utcnow() - requested_at).total_seconds()))

        self.out.publish(review, [message], acked)


GuardStream = Stream[GuardHandler]


def guard_stream(settings: GuardSettings, expert: Expert, metrics: GuardMetrics | None = None, *,
                 serve_http: bool = True) -> GuardStream:
    """The guard service: the review topic through ``GuardHandler`` in the guard's consumer group."""
    metrics = metrics or GuardMetrics()
    g = settings.guard
    return Stream(GuardHandler(settings, expert, metrics), kafka=settings.kafka, group_id=g.group_id,
                  topic=settings.topics.review, dead_letter_topic=settings.topics.dead_letter, metrics=metrics,
                  limits=ServiceLimits.from_config(g, max_event_bytes=MAX_REQUEST_BYTES, serve_http=serve_http),
                  processing=settings.processing)

