"""The guard teaches the probe, online: audit verdicts in from the verdicts topic, the probe's map and cut out.

The monitor worker sends a hash-selected audit sample of its events to the expert (worker/monitor.py); the guard
answers each with an audit verdict (``audit`` true, the probe's raw score in ``probe_p_unsafe``) on the verdicts
topic. ``RecalibrationFeed`` reads those verdicts back into the worker process and feeds the
``probes.calibration.recalibration.OnlineRecalibrator`` whose map and cut the monitor decides with.

Why every replica ends in the same state, and what that costs (docs/architecture.md, "Online recalibration"):

* **No consumer group.** The feed subscribes to the verdicts topic with no group id: every partition is its own
  (new ones too), so each replica sees every audit verdict, not the share a group would give it, and it commits
  nothing (no offsets to lose or to fight over).
* **A bounded lookback instead of a stored state.** A starting worker seeks each partition to ``audit.lookback_s``
  ago and replays it before it joins the worker group (at most ``audit.catch_up_timeout_s``): a restart rebuilds
  the window from the topic. The lookback must cover ``audit.window`` audits (window ÷ rate ÷ events per second).
* **One order for all.** Partitions interleave differently in every consumer, so audits are not fed as they
  arrive: they wait ``audit.settle_s`` after their ``decided_at`` and are fed in (decided_at, event_id) order.
  During the replay they are held until the feed has caught up (memory: a window plus a margin; the oldest
  beyond that are fed first, and only the final window matters).
* **Refits where the data says, not where a counter says.** A refit follows an audit whose event-id hash falls
  below 1 / ``audit.refit_every`` (one in ``refit_every`` on average), once ``audit.min_window`` are held; its
  version is the audit's ``decided_at`` in Unix milliseconds. Fed the same sequence, two replicas refit on the
  same windows and carry the same version, whenever each of them started.

* **Head refits off the event loop.** Under ``audit.refit=head`` each audit verdict carries the event's pooled
  activations (``probe_features``), and a refit costs seconds of numpy (out-of-fold fits on the window). It is
  computed in a thread from a snapshot of the window (``OnlineRecalibrator.snapshot`` → ``compute_refit``) and put
  in force on the event loop in one step (``apply``), so a verdict is decided by one whole state, old or new. The
  feed waits for it before feeding on; several refit points passed meanwhile (a replay, a burst) are computed once,
  at the last of them: the state a replica ends in is still the one of the last refit point it was fed, with that
  point's version.

A verdict the guard signed wrongly, or that does not parse, is skipped with a log line and a metric; duplicates
(an at-least-once guard may publish one twice) are fed once. Only ``source: "expert"`` verdicts are labels: a
fail-closed ``expert_unavailable`` answer says nothing about the event; under ``audit.refit=head`` one without
usable ``probe_features`` is skipped too (reason ``no_features``). Platt refits (microseconds) and everything
else here run on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from aiokafka import AIOKafkaConsumer, TopicPartition

from probes.calibration.recalibration import (
    OnlineRecalibrator,
    RecalibrationState,
    WindowSnapshot,
    audit_selected,
)
from probes.logs import get_logger
from worker.config import WorkerAuditConfig, WorkerSettings
from worker.decode import InvalidVerdict, decode_verdict
from worker.events import AUDIT_HEADER, Recalibration
from worker.metrics import WorkerMetrics
from worker.signing import GUARD, SignatureError, Signer
from worker.stream import Record

log = get_logger(__name__)
#: Audits held during the replay beyond the window before the oldest are fed (refits happen about every
#: ``refit_every`` audits, so this margin holds the last refit point of the replay with overwhelming probability).
_REPLAY_MARGIN_REFITS = 20
#: How often a feed whose verdicts topic did not exist looks for it again.
_RETRY_ASSIGN_S = 5.0


class AuditConsumer(Protocol):
    """The part of ``AIOKafkaConsumer`` the feed uses (unit tests put an in-memory fake behind it)."""

    def subscribe(self, topics: list[str]) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def assignment(self) -> set[TopicPartition]: ...
    async def offsets_for_times(self, timestamps: dict[TopicPartition, int]) -> dict[TopicPartition, Any]: ...
    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[Record]]: ...


@dataclass(order=True, frozen=True, slots=True)
class Audit:
    """One expert label of an audited event, ordered as every replica feeds it."""

    decided_at: float  # Unix seconds of the guard's verdict
    event_id: str
    probe_p_unsafe: float = field(compare=False)
    expert_unsafe: bool = field(compare=False)
    #: The event's pooled activations (audit.refit=head), else None.
    features: npt.NDArray[np.float32] | None = field(default=None, compare=False)
    tenant: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class _PlannedRefit:
    """A head refit point passed but not yet computed: the window as it was there, and that point's version."""

    window: WindowSnapshot
    when: datetime
    version: int


def recalibration_info(recalibrator: OnlineRecalibrator) -> Recalibration:
    """What a probe verdict carries about the state that decided it."""
    s: RecalibrationState = recalibrator.state
    return Recalibration(version=s.version, source=s.source, refit=s.refit, cut=s.cut, probe_cut=s.probe_cut, valid=s.valid,
                         window=s.n if s.fitted_at is not None else recalibrator.window_size, window_benign=s.n_benign)


def tenant_cap(config: WorkerAuditConfig) -> int:
    """Most audits of one tenant the window holds (``audit.tenant_share`` of it, at least one)."""
    return max(1, int(config.tenant_share * config.window))


def _has_header(record: Record, name: str) -> bool:
    return any(k == name for k, _ in record.headers or ())


class RecalibrationFeed:
    """Reads the guard's audit verdicts (every partition, no group) into the worker's ``OnlineRecalibrator``."""

    def __init__(self, settings: WorkerSettings, recalibrator: OnlineRecalibrator, metrics: WorkerMetrics, *,
                 consumer: AuditConsumer | None = None, clock: Callable[[], float] = time.time,
                 secret: bytes | None = None) -> None:
        self.settings = settings
        self.config = settings.audit
        self.recalibrator = recalibrator
        self.metrics = metrics
        # Audit labels are the guard's to write: a verdict signed with a worker key is no label (worker/decode.py).
        self.signer = Signer.from_config(settings.signing, "worker", verifies=GUARD, signs=False,
                                         service="recalibration", refusals=metrics.signature_refusals,
                                         insecure_gauge=metrics.signing_insecure)
        # The refit points are keyed like the sample: a producer cannot place them either.
        self.secret = secret
        self.consumer = consumer
        self.clock = clock
        self.caught_up = asyncio.Event()
        self._pending: list[Audit] = []
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._ends: dict[TopicPartition, int] = {}
        self._positions: dict[TopicPartition, int] = {}
        self._last_source: str | None = None
        self._assigned_at = -math.inf
        # The version the last refit point was given (≥ the state's: a planned head refit is not yet in force).
        self._version = recalibrator.state.version
        self._planned: _PlannedRefit | None = None
        self._refits = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ctd-refit")
        self._update_gauges()

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Subscribe to the verdicts topic with no group (every partition, nothing committed), seek to the lookback."""
        if self.consumer is None:
            self.consumer = AIOKafkaConsumer(**self.settings.kafka.client_kwargs(), group_id=None,
                                             enable_auto_commit=False, auto_offset_reset="earliest",
                                             isolation_level="read_committed")
        self.consumer.subscribe([self.settings.topics.verdicts])
        await self.consumer.start()
        await self._seek_lookback(wait_s=_RETRY_ASSIGN_S)

    async def _seek_lookback(self, wait_s: float = 0.0) -> None:
        assert self.consumer is not None
        consumer, topic = self.consumer, self.settings.topics.verdicts
        deadline = time.monotonic() + wait_s
        partitions = sorted(consumer.assignment(), key=lambda tp: tp.partition)
        while not partitions and time.monotonic() < deadline:  # group-less: assigned once the metadata is in
            await asyncio.sleep(0.05)
            partitions = sorted(consumer.assignment(), key=lambda tp: tp.partition)
        self._assigned_at = time.monotonic()
        if not partitions:
            # Nothing to replay, so caught up; poll() looks again every _RETRY_ASSIGN_S.
            log.error("recalibration.topic_missing", topic=topic,
                      hint="create it: ctd-monitor topics create; until then the bundle's cut decides")
            self._check_caught_up()
            return
        since_ms = int((self.clock() - self.config.lookback_s) * 1000)
        starts = await consumer.offsets_for_times({tp: since_ms for tp in partitions})
        self._ends = await consumer.end_offsets(partitions)
        for tp in partitions:
            found = starts.get(tp)
            offset = self._ends[tp] if found is None else int(found.offset)  # None: nothing that recent
            consumer.seek(tp, offset)
            self._positions[tp] = offset
        log.info("recalibration.replaying", topic=topic, partitions=len(partitions), lookback_s=self.config.lookback_s,
                 records=sum(self._ends[tp] - self._positions[tp] for tp in partitions))
        self._check_caught_up()

    async def catch_up(self, timeout_s: float) -> bool:
        """Poll until the lookback is replayed (True) or ``timeout_s`` passed (False: it goes on in ``run``)."""
        deadline = time.monotonic() + timeout_s
        while not self.caught_up.is_set() and time.monotonic() < deadline:
            await self.poll()
        if not self.caught_up.is_set():
            log.warning("recalibration.replay_incomplete", timeout_s=timeout_s, held=len(self._pending),
                        window=self.recalibrator.window_size)
        return self.caught_up.is_set()

    async def run(self) -> None:
        while True:
            await self.poll()

    async def stop(self) -> None:
        self._refits.shutdown(wait=False, cancel_futures=True)
        if self.consumer is not None:
            await self.consumer.stop()

    # ---------------------------------------------------------------- feed
    async def poll(self, timeout_ms: int = 200) -> None:
        assert self.consumer is not None, "start() first"
        if not self._ends:
            if time.monotonic() - self._assigned_at >= _RETRY_ASSIGN_S:
                await self._seek_lookback()
            if not self._ends:
                await asyncio.sleep(timeout_ms / 1000)
                return
        batch = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=1000)
        for tp, records in batch.items():
            for record in records:
                audit = self.take(record)
                if audit is not None:
                    heapq.heappush(self._pending, audit)
            if records:
                self._positions[tp] = records[-1].offset + 1
        self._check_caught_up()
        await self.release()

    def take(self, record: Record) -> Audit | None:
        """The audit label in a verdict record; None for any other verdict, and for a bad one (logged, counted)."""
        if not _has_header(record, AUDIT_HEADER):
            return None  # a probe verdict or a delegation's: most of the topic, never parsed
        try:
            # The lookback is read on purpose: on a topic without broker append times the bound is the lookback.
            verdict = decode_verdict(record, self.signer, roles=GUARD, now=self.clock(),
                                     max_age_s=max(self.settings.signing.max_age_s,
                                                   self.config.lookback_s + self.config.settle_s))
        except SignatureError as exc:
            self._skip(record, "bad_signature", str(exc))
            return None
        except InvalidVerdict as exc:
            self._skip(record, "malformed", str(exc)[:300])
            return None
        p = verdict.probe_p_unsafe
        if not verdict.audit or p is None or not math.isfinite(p):
            self._skip(record, "malformed", "not an audit verdict with the probe's score")
            return None
        if verdict.source != "expert":
            self._skip(record, "no_expert", verdict.source, quiet=True)
            return None
        features = None
        width = self.recalibrator.features_width
        if width is not None:
            # audit.refit=head learns from the activations: a verdict without them (a guard or worker from before
            # them, a window of audits from before the switch to head) teaches it nothing
            features = (None if verdict.probe_features is None
                        else np.asarray(verdict.probe_features, dtype=np.float32))
            if features is None or features.shape != (width,) or not np.all(np.isfinite(features)):
                got = "none" if features is None else f"{features.size} values"
                self._skip(record, "no_features", f"audit.refit=head needs {width} finite probe_features, got {got}")
                return None
        if verdict.event_id in self._seen:
            self._skip(record, "duplicate", verdict.event_id, quiet=True)
            return None
        self._seen[verdict.event_id] = None
        while len(self._seen) > 4 * self.config.window:
            self._seen.popitem(last=False)
        return Audit(verdict.decided_at.timestamp(), verdict.event_id, p, verdict.decision == "unsafe", features,
                     tenant=verdict.tenant)

    def _skip(self, record: Record, reason: str, detail: str, *, quiet: bool = False) -> None:
        self.metrics.audit_verdicts_skipped.labels(reason=reason).inc()
        (log.debug if quiet else log.warning)("recalibration.verdict_skipped", reason=reason, detail=detail,
                                              partition=record.partition, offset=record.offset)

    async def release(self) -> None:
        """Feed the audits that are settled (all of them in order once caught up; the oldest beyond the replay
        margin while replaying). A head refit point met on the way is computed in a thread once caught up, at the
        last such point (``compute_refit`` reads only its snapshot), and put in force here in one step."""
        horizon = self.clock() - self.config.settle_s if self.caught_up.is_set() else -math.inf
        cap = self.config.window + _REPLAY_MARGIN_REFITS * self.config.refit_every
        fed = 0
        recal = self.recalibrator
        while self._pending and (self._pending[0].decided_at <= horizon or len(self._pending) > cap):
            audit = heapq.heappop(self._pending)
            due = self._add(audit)
            fed += 1
            if due is None:
                continue
            when, version = due
            if self.config.refit == "head":
                self._planned = _PlannedRefit(recal.snapshot(), when, version)  # supersedes an earlier one
            else:
                self._refitted(recal.refit(when, version=version))
        if self._planned is not None and self.caught_up.is_set():
            planned = self._planned
            loop = asyncio.get_running_loop()
            try:
                refit = await loop.run_in_executor(self._refits, recal.compute_refit, planned.window, planned.when,
                                                   planned.version)
            except Exception as exc:  # noqa: BLE001 - the state in force stays; a replay would fail the same way
                self._planned = None
                log.error("recalibration.refit_failed", version=planned.version, window=planned.window.scores.size,
                          error=repr(exc)[:300])
                self._update_gauges()
                return
            self._planned = None
            self._refitted(recal.apply(refit))  # on the loop, in one step: no verdict sees half of it
        elif fed:
            self._update_gauges()

    def feed(self, audit: Audit) -> RecalibrationState | None:
        """One audit into the window, in order, and the refit it triggers computed at once, on this thread (tests;
        ``release`` is the feed's own path, which computes head refits in a thread)."""
        due = self._add(audit)
        if due is None:
            return None
        when, version = due
        self._planned = None
        return self._refitted(self.recalibrator.refit(when, version=version))

    def _add(self, audit: Audit) -> tuple[datetime, int] | None:
        """Add one audit; when its event id makes it a refit point, that refit's time and version."""
        recal = self.recalibrator
        if recal.add(audit.probe_p_unsafe, audit.expert_unsafe, audit.features, group=audit.tenant):
            self.metrics.audit_tenant_displaced.inc()
        self.metrics.audit_verdicts_in.inc()
        due = audit_selected(audit.event_id, 1 / self.config.refit_every, f"{self.config.salt}/refit", key=self.secret)
        if recal.window_size < self.config.min_window or not due:
            return None
        self._version = max(int(audit.decided_at * 1000), self._version + 1, recal.state.version + 1)
        return datetime.fromtimestamp(audit.decided_at, UTC), self._version

    def _refitted(self, state: RecalibrationState) -> RecalibrationState:
        self.metrics.recalibration_refits.labels(source=state.source).inc()
        self._update_gauges()
        if state.source != self._last_source:
            (log.info if state.source == "window" else log.warning)(
                "recalibration.source", source=state.source, refit=state.refit, version=state.version,
                probe_cut=state.probe_cut, cut=state.cut, window=state.n, window_benign=state.n_benign,
                valid=state.valid)
            self._last_source = state.source
        return state

    def _check_caught_up(self) -> None:
        if not self.caught_up.is_set() and all(self._positions.get(tp, 0) >= end for tp, end in self._ends.items()):
            self.caught_up.set()
            log.info("recalibration.caught_up", held=len(self._pending), window=self.recalibrator.window_size,
                     version=self.recalibrator.state.version)

    def _update_gauges(self) -> None:
        recal, m = self.recalibrator, self.metrics
        state = recal.state
        m.recalibration_version.set(state.version)
        m.recalibration_window_cut.set(1 if state.source == "window" else 0)
        m.recalibration_cut.labels(scale="calibrated").set(state.cut)
        m.recalibration_cut.labels(scale="probe").set(math.nan if state.probe_cut is None else state.probe_cut)
        m.recalibration_window.set(recal.window_size)
        rate = recal.window_benign_flag_rate()
        m.recalibration_benign_flag_rate.set(math.nan if rate is None else rate)
