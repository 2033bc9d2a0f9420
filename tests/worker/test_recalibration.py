"""The worker's recalibration feed alone, against an in-memory verdicts topic (no broker).

The broker test (test_audit_kafka) runs the whole loop: monitor → guard → feed → recalibrated verdicts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from pydantic import ValidationError

from probes.calibration.recalibration import OnlineRecalibrator, audit_selected
from probes.config import load_settings
from probes.errors import ConfigError
from probes.heads.inference import LinearHead
from tests.worker.helpers import role_signer, signing_config
from worker.alerts import AlertPolicy
from worker.config import AlertsConfig, TopicsConfig, WorkerAuditConfig, WorkerSettings
from worker.events import (
    AUDIT_HEADER,
    BudgetState,
    ConversationEvent,
    ReviewRequest,
    Timings,
    Verdict,
    float32_list,
)
from worker.metrics import WorkerMetrics
from worker.recalibration import Audit, RecalibrationFeed
from worker.signing import Signer

TOPIC = TopicsConfig().verdicts
T0 = 1_800_000_000.0  # the test's "now" (Unix seconds)
KEY = signing_config()


def audit_verdict(i: int, p: float, unsafe: bool, *, decided_at: float, source: str = "expert",
                  delegated: bool = False) -> Verdict:
    return Verdict(
        event_id=f"e{i}", conversation_id=f"c{i}", tenant="t", p_unsafe=0.9 if unsafe else 0.1, dv=None,
        delegated=delegated, decision="unsafe" if unsafe else "safe", source=source, budget=BudgetState(),
        bundle_version="b", model_version="m", expert_version="x", timings=Timings(),
        decided_at=dt.datetime.fromtimestamp(decided_at, dt.UTC), audit=True, probe_p_unsafe=p,
    )


def verdict_record(partition: int, offset: int, body: bytes, *, timestamp: float, audit_header: bool = True,
                   signer: Signer | None = None, key: bytes = b"k") -> ConsumerRecord[bytes, bytes]:
    headers: list[tuple[str, bytes]] = [(AUDIT_HEADER, b"1")] if audit_header else []
    if signer is not None:
        headers += signer.headers("verdict", key, body, now=timestamp)  # signed when it was written
    return ConsumerRecord(topic=TOPIC, partition=partition, offset=offset, timestamp=int(timestamp * 1000),
                          timestamp_type=0, key=key, value=body, checksum=None, serialized_key_size=len(key),
                          serialized_value_size=len(body), headers=tuple(headers))


@dataclasses.dataclass
class Found:
    offset: int


class FakeVerdictTopic:
    """The part of ``AIOKafkaConsumer`` the feed uses: a few partitions of records, handed out ``per_poll`` at a
    time in ``order`` of partitions (another order, another interleaving)."""

    def __init__(self, partitions: dict[int, list[ConsumerRecord[bytes, bytes]]], *, per_poll: int = 3,
                 order: Sequence[int] | None = None) -> None:
        self.log = partitions
        self.per_poll = per_poll
        self.order = list(order) if order is not None else sorted(partitions)
        self.position: dict[TopicPartition, int] = {}
        self.subscribed: list[str] = []
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def subscribe(self, topics: list[str]) -> None:
        self.subscribed = list(topics)

    def assignment(self) -> set[TopicPartition]:
        # group-less: every partition of the topic (none while it does not exist)
        return {TopicPartition(TOPIC, n) for n in self.log} if self.subscribed == [TOPIC] else set()

    async def offsets_for_times(self, timestamps: dict[TopicPartition, int]) -> dict[TopicPartition, Any]:
        out: dict[TopicPartition, Any] = {}
        for tp, ms in timestamps.items():
            hit = next((r.offset for r in self.log[tp.partition] if r.timestamp >= ms), None)
            out[tp] = None if hit is None else Found(hit)
        return out

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.log[tp.partition]) for tp in partitions}

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.position[partition] = offset

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        for n in self.order:
            tp = TopicPartition(TOPIC, n)
            at = self.position.get(tp, len(self.log[n]))
            taken = self.log[n][at:at + self.per_poll]
            if taken:
                self.position[tp] = at + len(taken)
                return {tp: taken}
        await asyncio.sleep(min(timeout_ms, 10) / 1000)  # as a real poll waits: the event loop runs meanwhile
        return {}


def settings(**audit: Any) -> WorkerSettings:
    config = {"rate": 0.5, "window": 60, "min_window": 20, "refit_every": 5, "epsilon": 0.2, "delta": 0.2,
              "lookback_s": 3600.0, "settle_s": 5.0, **audit}
    return WorkerSettings(audit=WorkerAuditConfig(**config), signing=KEY)


@dataclasses.dataclass
class Clock:
    now: float

    def __call__(self) -> float:
        return self.now


def make_feed(topic: FakeVerdictTopic, s: WorkerSettings, *, now: float = T0) -> RecalibrationFeed:
    return RecalibrationFeed(s, OnlineRecalibrator(s.audit, offline_cut=0.5), WorkerMetrics(), consumer=topic,
                             clock=Clock(now))


def clock(feed: RecalibrationFeed) -> Clock:
    assert isinstance(feed.clock, Clock)
    return feed.clock


def shifted_audits(n: int, *, start: float, seed: int = 0) -> list[tuple[int, float, bool, float]]:
    """Benign traffic whose probe scores drifted up: the offline cut 0.5 flags most of it."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        unsafe = bool(rng.random() < 0.3)
        z = rng.normal(3.0 if unsafe else 1.0, 0.7)
        out.append((i, float(1 / (1 + math.exp(-z))), unsafe, start + i * 1.0))
    return out


def spread(audits: list[tuple[int, float, bool, float]], partitions: int, signer: Signer,
           noise: int = 0) -> dict[int, list[ConsumerRecord[bytes, bytes]]]:
    """Audits over partitions by event (as conversation keys would spread them), with probe verdicts between."""
    log: dict[int, list[ConsumerRecord[bytes, bytes]]] = {n: [] for n in range(partitions)}
    for i, p, unsafe, when in audits:
        n = i % partitions
        for _ in range(noise):  # probe verdicts: no audit header, never parsed
            log[n].append(verdict_record(n, len(log[n]), b"not even json", timestamp=when, audit_header=False))
        body = audit_verdict(i, p, unsafe, decided_at=when).to_json()
        log[n].append(verdict_record(n, len(log[n]), body, timestamp=when, signer=signer, key=f"c{i}".encode()))
    return log


async def replayed(feed: RecalibrationFeed) -> RecalibrationFeed:
    await feed.start()
    assert await feed.catch_up(5.0)
    await feed.release()
    return feed


async def test_replicas_that_read_the_audits_interleaved_differently_reach_the_same_state() -> None:
    s = settings()
    signer = role_signer("guard")
    audits = shifted_audits(200, start=T0 - 1000)
    a = await replayed(make_feed(FakeVerdictTopic(spread(audits, 3, signer, noise=2), per_poll=2), s))
    b = await replayed(make_feed(FakeVerdictTopic(spread(audits, 3, signer, noise=2), per_poll=7,
                                                  order=[2, 0, 1]), s))
    sa, sb = a.recalibrator.state, b.recalibrator.state
    assert sa.source == "window" and sa.version > 0
    assert sa == sb, "same audits, another interleaving: the same map, cut and version"
    assert a.recalibrator.window_size == s.audit.window == b.recalibrator.window_size
    # the version is the triggering audit's decided_at in ms: it says when, the same everywhere
    assert T0 - 1000 <= sa.version / 1000 <= T0
    # the shifted benign traffic is brought under the cut: the window's realised benign flag rate ≤ ε
    rate = a.recalibrator.window_benign_flag_rate()
    assert rate is not None and rate <= s.audit.epsilon
    assert a.metrics.recalibration_version._value.get() == sa.version
    assert a.metrics.recalibration_window_cut._value.get() == 1
    assert a.metrics.recalibration_window._value.get() == s.audit.window
    assert a.metrics.recalibration_cut.labels(scale="probe")._value.get() == sa.probe_cut
    assert a.metrics.audit_verdicts_in._value.get() == 200


async def test_a_replica_started_later_from_the_lookback_matches_one_that_saw_everything_live() -> None:
    s = settings()
    signer = role_signer("guard")
    audits = shifted_audits(300, start=T0 - 300)
    # live: every audit arrives after settle_s, fed one poll at a time as the clock moves
    topic = FakeVerdictTopic({0: [], 1: []})
    live = make_feed(topic, s, now=T0 - 301)
    await live.start()
    full = spread(audits, 2, signer)
    for record in sorted((r for rs in full.values() for r in rs), key=lambda r: r.timestamp):
        topic.log[record.partition].append(record)
        clock(live).now = record.timestamp / 1000 + 0.5
        await live.poll(timeout_ms=0)
    clock(live).now = T0 + s.audit.settle_s
    await live.release()
    # late: starts at T0 with a lookback that covers the last window and more, not the whole stream
    late = await replayed(make_feed(FakeVerdictTopic(spread(audits, 2, signer)), settings(lookback_s=150.0),
                                    now=T0 + s.audit.settle_s))
    assert late.recalibrator.window_size == s.audit.window  # rebuilt from the lookback alone (150 of 300 audits)
    assert live.recalibrator.state == late.recalibrator.state


async def test_audits_settle_before_they_are_fed() -> None:
    s = settings(min_window=10, refit_every=1)
    signer = role_signer("guard")
    topic = FakeVerdictTopic({0: []})
    feed = make_feed(topic, s)
    await feed.start()
    assert feed.caught_up.is_set(), "an empty lookback is caught up at once"
    for i, p, unsafe, _ in shifted_audits(12, start=T0):
        body = audit_verdict(i, p, unsafe, decided_at=T0).to_json()
        topic.log[0].append(verdict_record(0, len(topic.log[0]), body, timestamp=T0, signer=signer))
    for _ in range(5):
        await feed.poll(timeout_ms=0)
    assert feed.recalibrator.window_size == 0, "decided just now: a slower partition may still hold older ones"
    clock(feed).now = T0 + s.audit.settle_s
    await feed.poll(timeout_ms=0)
    assert feed.recalibrator.window_size == 12 and feed.recalibrator.state.version > 0


async def test_bad_duplicate_and_unlabelled_verdicts_are_skipped_and_counted_never_fatal() -> None:
    s = settings()
    signer = role_signer("guard")
    now = T0 - 100
    good = audit_verdict(1, 0.7, False, decided_at=now).to_json()
    unavailable = audit_verdict(2, 0.7, True, decided_at=now, source="expert_unavailable").to_json()
    no_score = audit_verdict(3, 0.7, True, decided_at=now).model_copy(update={"probe_p_unsafe": None}).to_json()
    records = [
        verdict_record(0, 0, good, timestamp=now, signer=signer),
        verdict_record(0, 1, good, timestamp=now, signer=signer),  # the guard published it twice
        verdict_record(0, 2, b"{not json", timestamp=now, signer=signer),
        verdict_record(0, 3, orjson.dumps({"event_id": "x"}), timestamp=now, signer=signer),
        verdict_record(0, 4, good, timestamp=now, signer=role_signer("worker")),  # a worker key is no guard's
        verdict_record(0, 5, unavailable, timestamp=now, signer=signer),
        verdict_record(0, 6, no_score, timestamp=now, signer=signer),
        verdict_record(0, 7, good, timestamp=now, audit_header=False, signer=signer),  # not an audit: not read
    ]
    feed = await replayed(make_feed(FakeVerdictTopic({0: records}, per_poll=1), s))
    skipped = feed.metrics.audit_verdicts_skipped
    assert {r: skipped.labels(reason=r)._value.get() for r in ("duplicate", "malformed", "bad_signature",
                                                               "no_expert")} == {
        "duplicate": 1, "malformed": 3, "bad_signature": 1, "no_expert": 1}
    assert feed.recalibrator.window_size == 1 and feed.metrics.audit_verdicts_in._value.get() == 1


async def test_the_lookback_bounds_the_replay_and_nothing_is_committed() -> None:
    s = settings(lookback_s=50.0, settle_s=0.0)
    signer = role_signer("guard")
    topic = FakeVerdictTopic(spread(shifted_audits(100, start=T0 - 100), 1, signer))
    feed = await replayed(make_feed(topic, s))
    assert feed.recalibrator.window_size == 50  # only the last 50 s of audits
    assert not hasattr(topic, "commit") and topic.subscribed == [TOPIC]


def test_refit_points_are_chosen_by_the_event_id_about_every_refit_every() -> None:
    s = settings(min_window=20, refit_every=5)
    recal = OnlineRecalibrator(s.audit, offline_cut=0.5)
    feed = RecalibrationFeed(s, recal, WorkerMetrics(), consumer=FakeVerdictTopic({0: []}), clock=lambda: T0)
    refits = sum(feed.feed(Audit(T0 + i, f"e{i}", 0.6, i % 3 == 0)) is not None for i in range(1000))
    assert 150 < refits < 250  # ≈ (1000 − 20) / 5
    due = [audit_selected(f"e{i}", 1 / 5, "audit/refit") for i in range(20, 1000)]
    assert refits == sum(due)


def test_review_requests_say_delegated_audit_or_both_and_old_ones_still_read() -> None:
    event = ConversationEvent(event_id="e", conversation_id="c", created_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
                              messages=[{"role": "user", "content": "hi"}])
    base = {"event": event, "p_unsafe": 0.4, "dv": None, "reason": "r", "threshold": None, "bundle_version": "b",
            "requested_at": event.created_at}
    old = ReviewRequest(**base)
    assert old.delegated and not old.audit
    assert b'"audit"' not in old.to_json() and b'"delegated"' not in old.to_json(), "readers from before still read"
    audit = ReviewRequest(**base, delegated=False, audit=True)
    assert orjson.loads(audit.to_json())["audit"] is True
    assert ReviewRequest.model_validate(orjson.loads(audit.to_json())) == audit
    with pytest.raises(ValidationError, match="delegated, audited or both"):
        ReviewRequest(**base, delegated=False)


def test_verdicts_leave_the_added_fields_out_while_audits_are_off() -> None:
    plain = audit_verdict(1, 0.3, False, decided_at=T0).model_copy(
        update={"audit": False, "probe_p_unsafe": None, "delegated": True})
    body = orjson.loads(plain.to_json())
    assert not {"audit", "probe_p_unsafe", "recalibration"} & set(body)
    assert Verdict.model_validate(body) == plain
    with pytest.raises(ValidationError):
        audit_verdict(1, 1.5, False, decided_at=T0)


def test_an_audit_label_is_not_a_final_verdict_and_never_alerts() -> None:
    policy = AlertPolicy(AlertsConfig())
    label = audit_verdict(1, 0.2, True, decided_at=T0)  # the expert says unsafe, the probe's verdict stands
    assert not policy.is_final(label) and policy.consider(label, 0.0) == (None, None)
    delegated_and_audited = audit_verdict(2, 0.2, True, decided_at=T0, delegated=True)
    assert policy.is_final(delegated_and_audited) and policy.consider(delegated_and_audited, 0.0)[0] is not None
    probe = label.model_copy(update={"source": "probe", "event_id": "e3", "conversation_id": "c3"})
    assert policy.is_final(probe)


async def test_a_missing_verdicts_topic_is_looked_for_again_and_then_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.recalibration._RETRY_ASSIGN_S", 0.1)
    s = settings(settle_s=0.0, min_window=10, refit_every=1)
    signer = role_signer("guard")
    topic = FakeVerdictTopic(spread(shifted_audits(12, start=T0 - 50), 1, signer))
    present = topic.log
    topic.log = {}  # not created yet
    feed = make_feed(topic, s)
    await feed.start()
    assert feed.caught_up.is_set() and feed.recalibrator.window_size == 0  # the bundle's cut decides meanwhile
    topic.log = present
    for _ in range(30):
        await feed.poll(timeout_ms=10)
    assert feed.recalibrator.window_size == 12 and feed.recalibrator.state.version > 0


# ---------------------------------------------------------------- audit.refit=head
WIDTH = 12


def bundle_head() -> LinearHead:
    """A head that reads axis 0, while the new traffic's harm is on axis 1 (what the audits must teach)."""
    w = np.zeros(WIDTH, dtype=np.float32)
    w[0] = 2.0
    return LinearHead(mean=np.zeros(WIDTH, dtype=np.float32), scale=np.ones(WIDTH, dtype=np.float32), weight=w,
                      bias=0.0)


def head_audits(n: int, *, start: float, seed: int = 0) -> list[tuple[int, float, bool, float, np.ndarray]]:
    """(i, the bundle head's score, expert unsafe, decided_at, pooled activations) of shifted traffic."""
    rng = np.random.default_rng(seed)
    head = bundle_head()
    out = []
    for i in range(n):
        unsafe = bool(rng.random() < 0.3)
        x = rng.normal(size=WIDTH).astype(np.float32)
        x[1] += 3.0 if unsafe else 0.0
        out.append((i, float(head.proba(x[None, :])[0]), unsafe, start + i * 1.0, x))
    return out


def head_spread(audits: list[tuple[int, float, bool, float, np.ndarray]], partitions: int,
                signer: Signer) -> dict[int, list[ConsumerRecord[bytes, bytes]]]:
    log: dict[int, list[ConsumerRecord[bytes, bytes]]] = {n: [] for n in range(partitions)}
    for i, p, unsafe, when, x in audits:
        n = i % partitions
        body = audit_verdict(i, p, unsafe, decided_at=when).model_copy(
            update={"probe_features": float32_list(x)}).to_json()
        log[n].append(verdict_record(n, len(log[n]), body, timestamp=when, signer=signer, key=f"c{i}".encode()))
    return log


def head_feed(topic: FakeVerdictTopic, s: WorkerSettings, *, now: float = T0) -> RecalibrationFeed:
    return RecalibrationFeed(s, OnlineRecalibrator(s.audit, offline_cut=0.5, head=bundle_head()), WorkerMetrics(),
                             consumer=topic, clock=Clock(now))


async def test_head_refits_learn_from_the_carried_features_and_replicas_agree_with_the_inline_path() -> None:
    s = settings(refit="head")
    signer = role_signer("guard")
    audits = head_audits(150, start=T0 - 1000)
    a = await replayed(head_feed(FakeVerdictTopic(head_spread(audits, 3, signer), per_poll=2), s))
    b = await replayed(head_feed(FakeVerdictTopic(head_spread(audits, 3, signer), per_poll=7, order=[2, 0, 1]), s))
    # the reference: every audit fed in (decided_at, event_id) order, each refit computed inline at its point
    inline = head_feed(FakeVerdictTopic({0: []}), s)
    states = [inline.feed(Audit(when, f"e{i}", p, unsafe, x)) for i, p, unsafe, when, x in sorted(
        audits, key=lambda t: (t[3], f"e{t[0]}"))]
    sa = a.recalibrator.state
    assert sa.refit == "head" and sa.source == "window" and sa.probe_cut is None
    assert sa == b.recalibrator.state == inline.recalibrator.state, "one state, whichever path and interleaving"
    assert sa.version == [st for st in states if st is not None][-1].version
    assert T0 - 1000 <= sa.version / 1000 <= T0
    head = a.recalibrator.head
    assert head is not None and not np.array_equal(head.weight, bundle_head().weight)
    np.testing.assert_array_equal(head.weight, inline.recalibrator.head.weight)  # type: ignore[union-attr]
    # what the features taught: the refit head ranks the shifted traffic, which the bundle's head cannot
    x = np.stack([t[4] for t in audits])
    y = np.asarray([t[2] for t in audits])
    refit_scores, bundle_scores = head.proba(x), bundle_head().proba(x)
    assert refit_scores[y].min() > np.median(refit_scores[~y])
    assert abs(np.median(bundle_scores[y]) - np.median(bundle_scores[~y])) < 0.2
    # the decision needs the features now; the window's benign flag rate is the refit head's
    with pytest.raises(ValueError, match="features"):
        a.recalibrator.flags([0.5])
    rate = a.recalibrator.window_benign_flag_rate()
    assert rate is not None and rate <= s.audit.epsilon
    assert math.isnan(a.metrics.recalibration_cut.labels(scale="probe")._value.get())
    assert a.metrics.recalibration_window_cut._value.get() == 1


async def test_a_head_refit_runs_in_a_thread_and_is_put_in_force_in_one_step() -> None:
    s = settings(refit="head", min_window=20, refit_every=1, settle_s=0.0)
    signer = role_signer("guard")
    topic = FakeVerdictTopic({0: []})
    feed = head_feed(topic, s)
    await feed.start()
    recal = feed.recalibrator
    real = recal.compute_refit
    entered, gate = threading.Event(), threading.Event()
    threads: list[str] = []

    def compute(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        entered.set()
        assert gate.wait(10)
        return real(*args)

    recal.compute_refit = compute  # type: ignore[method-assign,assignment]
    audits = head_audits(40, start=T0 - 100)
    for records in head_spread(audits, 1, signer).values():
        topic.log[0].extend(records)
    topic.per_poll = 40
    before = recal.state
    polled = asyncio.create_task(feed.poll(timeout_ms=0))
    while not entered.is_set():
        await asyncio.sleep(0.005)  # the event loop runs while the refit is computed
    # meanwhile the monitor decides with the state in force, whole: the bundle's head and cut
    assert recal.state == before and recal.head is not None and recal.window_size == 40
    np.testing.assert_array_equal(recal.head.weight, bundle_head().weight)
    assert recal.flags([0.2, 0.9]).tolist() == [False, True]
    gate.set()
    await polled
    assert threads and all(t.startswith("ctd-refit") for t in threads)
    assert len(threads) == 1, "the refit points of one poll are computed once, at the last of them"
    due = [f"e{i}" for i, *_ in audits[19:] if audit_selected(f"e{i}", 1.0, "audit/refit")]
    assert due and recal.state.version == int(audits[int(due[-1][1:])][3] * 1000)
    assert recal.state.refit == "head" and recal.state.n == 40
    assert feed.metrics.recalibration_refits.labels(source=recal.state.source)._value.get() == 1
    await feed.stop()


async def test_audit_verdicts_without_usable_features_are_skipped_under_a_head_refit() -> None:
    s = settings(refit="head")
    signer = role_signer("guard")
    now = T0 - 100
    good = audit_verdict(1, 0.7, False, decided_at=now).model_copy(
        update={"probe_features": float32_list(np.ones(WIDTH))}).to_json()
    none = audit_verdict(2, 0.7, False, decided_at=now).to_json()  # a guard from before probe_features
    narrow = audit_verdict(3, 0.7, True, decided_at=now).model_copy(
        update={"probe_features": [0.5] * (WIDTH - 1)}).to_json()
    records = [verdict_record(0, i, body, timestamp=now, signer=signer) for i, body in enumerate([good, none, narrow])]
    feed = await replayed(head_feed(FakeVerdictTopic({0: records}, per_poll=1), s))
    skipped = feed.metrics.audit_verdicts_skipped
    assert skipped.labels(reason="no_features")._value.get() == 2
    assert feed.recalibrator.window_size == 1 and feed.metrics.audit_verdicts_in._value.get() == 1
    # in Platt mode the same verdicts are all labels: the features are not needed, nor kept
    platt = await replayed(make_feed(FakeVerdictTopic({0: records}, per_poll=1), settings()))
    assert platt.recalibrator.window_size == 3


def test_probe_features_travel_as_float32_decimals_and_are_left_out_when_absent() -> None:
    row = np.random.default_rng(0).normal(size=576).astype(np.float32)
    values = float32_list(row)
    np.testing.assert_array_equal(np.asarray(values, dtype=np.float32), row)
    assert len(orjson.dumps(values)) < 576 * 13  # not float64 reprs of float32 values (~20 characters each)
    event = ConversationEvent(event_id="e", conversation_id="c", created_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
                              messages=[{"role": "user", "content": "hi"}])
    request = ReviewRequest(event=event, p_unsafe=0.4, dv=None, reason="audit", threshold=None, bundle_version="b",
                            requested_at=event.created_at, delegated=False, audit=True, probe_features=values)
    assert ReviewRequest.model_validate(orjson.loads(request.to_json())) == request
    assert b"probe_features" not in request.model_copy(update={"probe_features": None}).to_json()
    assert b"probe_features" not in audit_verdict(1, 0.3, False, decided_at=T0).to_json()


def test_the_head_refit_is_configured_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTD_AUDIT__REFIT", "head")
    monkeypatch.setenv("CTD_AUDIT__HEAD_L2", "3.5")
    loaded = load_settings(cls=WorkerSettings)
    assert loaded.audit.refit == "head" and loaded.audit.head_l2 == 3.5
    monkeypatch.setenv("CTD_AUDIT__REFIT", "mlp")
    with pytest.raises(ConfigError, match="refit"):
        load_settings(cls=WorkerSettings)


async def test_a_head_refit_that_fails_leaves_the_state_in_force_and_the_feed_running() -> None:
    s = settings(refit="head", min_window=20, refit_every=1, settle_s=0.0)
    topic = FakeVerdictTopic(head_spread(head_audits(30, start=T0 - 100), 1, role_signer("guard")), per_poll=30)
    feed = head_feed(topic, s)

    def broken(*args: Any) -> Any:
        raise np.linalg.LinAlgError("singular")

    feed.recalibrator.compute_refit = broken  # type: ignore[method-assign,assignment]
    await replayed(feed)
    assert feed.recalibrator.state.version == 0 and feed.recalibrator.window_size == 30
