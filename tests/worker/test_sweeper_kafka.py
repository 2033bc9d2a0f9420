"""Nothing ends un-final (issue 22 item 4): a delegated event whose review request the guard dead-letters (bad
signature, schema skew) gets a final expert_unavailable verdict and a critical alert from the alerter's sweeper,
and a restart of the guard process loses no deadline (the state is rebuilt from the verdicts topic)."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import orjson
import pytest

from probes.experts.encoder_head import EncoderHeadExpert
from tests.worker.helpers import (
    guard_settings,
    new_topics,
    produce_signed,
    read_topic,
    review_requests,
    role_signer,
    signing_config,
    wait_for,
)
from worker.config import GuardSettings, SweeperConfig
from worker.events import BudgetState, Timings, Verdict, utcnow
from worker.main import GuardProcess
from worker.metrics import AlerterMetrics
from worker.signing import Signer
from worker.sweeper import DelegationSweeper, Pending


def _probe_verdict(event_id: str, conversation_id: str, *, decided_at: dt.datetime | None = None) -> Verdict:
    return Verdict(event_id=event_id, conversation_id=conversation_id, tenant="t", p_unsafe=0.3, dv=0.1,
                   delegated=True, decision="safe", source="probe", budget=BudgetState(threshold=0.2),
                   bundle_version="b", model_version="m", timings=Timings(), decided_at=decided_at or utcnow(),
                   metadata={"secret": "x" * 100})


def _signed(signer: Signer, kind: Any, key: bytes, body: bytes) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    return key, body, signer.headers(kind, key, body)


def test_the_sweeper_tracks_delegations_until_final_and_stays_bounded() -> None:
    from aiokafka import TopicPartition

    now = [utcnow()]
    settings = GuardSettings(sweeper=SweeperConfig(deadline_s=10, lookback_s=60, max_pending=2))
    sweeper = DelegationSweeper(settings, AlerterMetrics(), Signer.from_config(signing_config(), "guard", verifies=("worker", "guard")),
                                clock=lambda: now[0])
    tp = TopicPartition("verdicts", 0)
    sweeper._rebuilt.add(tp)
    a, b = _probe_verdict("a", "ca", decided_at=now[0]), _probe_verdict("b", "cb", decided_at=now[0])
    sweeper.observe(tp, a)
    sweeper.observe(tp, b)
    sweeper.observe(tp, a.model_copy(update={"source": "expert"}))  # a is final
    sweeper.observe(tp, a)  # a redelivered probe verdict of a final event is not tracked again
    sweeper.observe(tp, _probe_verdict("u", "cu").model_copy(update={"delegated": False}))  # not delegated
    assert sweeper.due() == [] and sweeper.snapshot()["pending"] == 1
    now[0] += dt.timedelta(seconds=11)
    due = sweeper.due()
    assert [(p.verdict.event_id, why) for p, why in due] == [("b", "deadline")]
    final = sweeper.final_verdict(due[0][0], now[0])
    assert (final.source, final.decision, final.delegated) == ("expert_unavailable", "unsafe", True)
    assert final.metadata == {"unavailable_reason": "review_deadline", "probe_p_unsafe": 0.3}  # no event metadata
    probe_said = GuardSettings(guard={"unavailable_decision": "probe"}, sweeper=SweeperConfig(deadline_s=1))
    assert DelegationSweeper(probe_said, AlerterMetrics(), sweeper.signer).final_verdict(
        Pending(tp, b, now[0]), now[0]).decision == "safe"
    for i in range(4):  # past max_pending the oldest is swept early (fail closed), state stays bounded
        sweeper.observe(tp, _probe_verdict(f"o{i}", f"co{i}", decided_at=now[0]))
    assert sweeper.snapshot()["pending"] == 2
    assert [(p.verdict.event_id, why) for p, why in sweeper.due()] == [("o0", "overflow"), ("o1", "overflow")]
    # a partition not yet rebuilt is never swept (its final verdicts may still be in the replay)
    other = TopicPartition("verdicts", 1)
    sweeper.observe(other, _probe_verdict("p", "cp", decided_at=now[0] - dt.timedelta(seconds=100)))
    assert all(p.verdict.event_id != "p" for p, _ in sweeper.due())
    with pytest.raises(ValueError):
        SweeperConfig(deadline_s=100, lookback_s=10)


@pytest.mark.kafka
async def test_a_review_request_the_guard_dead_letters_still_ends_final_with_an_alert(
    kafka_broker: Any, cache_dir: Path, datasets_dir: Path, small_expert: EncoderHeadExpert
) -> None:
    topics = new_topics(kafka_broker.create_topics)
    gs = guard_settings(kafka_broker.bootstrap, topics, cache_dir).model_copy(update={
        "signing": signing_config(), "sweeper": SweeperConfig(deadline_s=6, lookback_s=120, check_interval_s=0.2)})
    signer = role_signer("worker")  # the worker writes probe verdicts and review requests
    template = orjson.loads(review_requests(datasets_dir, 1)[0][1])

    def request(event_id: str, **extra: Any) -> bytes:
        body = {**template, **extra}
        body["event"] = {**template["event"], "event_id": event_id, "conversation_id": f"c-{event_id}"}
        return orjson.dumps(body)

    bootstrap = kafka_broker.bootstrap
    ids = ["forged", "skewed", "reviewed"]
    verdicts = [_signed(signer, "verdict", f"c-{i}".encode(), _probe_verdict(i, f"c-{i}").to_json()) for i in ids]
    reviews = [
        # bad signature: the worker's signature of another body
        (b"c-forged", request("forged"), signer.headers("review_request", b"c-forged", request("other"))),
        _signed(signer, "review_request", b"c-skewed", request("skewed", priority="high")),  # a newer schema
        _signed(signer, "review_request", b"c-reviewed", request("reviewed")),
    ]
    process = GuardProcess(gs, small_expert)
    task = asyncio.create_task(process.run())
    await wait_for(lambda: process.ready() or task.done(), timeout=60)
    await produce_signed(bootstrap, topics.verdicts, verdicts)
    await produce_signed(bootstrap, topics.review, reviews)

    def finals(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            if r["source"] != "probe":
                out.setdefault(r["event_id"], []).append(r)
        return out

    got = await read_topic(bootstrap, topics.verdicts, until=lambda r: set(finals(r)) >= set(ids), timeout=60)
    final = finals(got)
    assert [v["source"] for v in final["reviewed"]] == ["expert"]
    for event_id in ("forged", "skewed"):
        (v,) = final[event_id]
        assert (v["source"], v["decision"], v["delegated"]) == ("expert_unavailable", "unsafe", True)
        assert v["metadata"]["unavailable_reason"] == "review_deadline" and "secret" not in v["metadata"]
    alerts = await read_topic(bootstrap, topics.alerts, until=lambda r: {"forged", "skewed"} <= {a["event_id"] for a in r},
                              timeout=30)
    assert {a["event_id"]: a["severity"] for a in alerts if a["event_id"] in ("forged", "skewed")} == {
        "forged": "critical", "skewed": "critical"}
    dead = await read_topic(bootstrap, topics.dead_letter, until=lambda r: len(r) >= 2, timeout=30)
    assert sorted(d["reason"] for d in dead) == ["bad_signature", "invalid_review_request"]
    metrics = process.alerter.metrics if process.alerter else None
    assert metrics is not None and metrics.sweeper_swept.labels(reason="deadline")._value.get() == 2

    # A restart before the deadline: the alerter had read (and committed) the delegated verdict, so only the
    # rebuilt state knows it is waiting.
    pending = _signed(signer, "verdict", b"c-restart", _probe_verdict("restart", "c-restart").to_json())
    await produce_signed(bootstrap, topics.verdicts, [pending])
    assert process.alerter is not None and process.alerter.handler.sweeper is not None
    sweeper = process.alerter.handler.sweeper
    await wait_for(lambda: "restart" in sweeper._pending and process.alerter is not None
                   and process.alerter.tracker.in_flight() == 0, 10)
    await asyncio.sleep(0.5)  # committed (commit_interval_s 0.2)
    process.stop()
    await asyncio.wait_for(task, 30)
    again = GuardProcess(gs, small_expert)
    task = asyncio.create_task(again.run())
    try:
        got = await read_topic(bootstrap, topics.verdicts, until=lambda r: "restart" in finals(r), timeout=60)
        (v,) = finals(got)["restart"]
        assert v["source"] == "expert_unavailable"
        await asyncio.sleep(2.0)  # the rebuild saw the earlier sweeps: nothing is finalised twice
        got = await read_topic(bootstrap, topics.verdicts, until=lambda r: False, timeout=1.0)
        assert {k: len(v) for k, v in finals(got).items()} == {i: 1 for i in [*ids, "restart"]}
    finally:
        again.stop()
        await asyncio.wait_for(task, 30)


async def test_a_failed_sweep_is_retried_unless_settled_while_its_send_was_out() -> None:
    """A fail-closed verdict whose send fails is tried again at the next check; not when the expert's verdict
    arrived during that send (it would supersede the expert's) or the partition went to another alerter."""
    from aiokafka import TopicPartition

    now = [utcnow()]
    settings = GuardSettings(sweeper=SweeperConfig(deadline_s=10, lookback_s=60))
    sweeper = DelegationSweeper(settings, AlerterMetrics(),
                                Signer.from_config(signing_config(), "guard", verifies=("worker", "guard")),
                                clock=lambda: now[0])
    tp, other = TopicPartition("verdicts", 0), TopicPartition("verdicts", 1)
    sweeper._rebuilt |= {tp, other}
    sweeper._owned |= {tp, other}
    for event_id, partition in (("late", tp), ("settled", tp), ("moved", other)):
        sweeper.observe(partition, _probe_verdict(event_id, f"c-{event_id}", decided_at=now[0]))
    now[0] += dt.timedelta(seconds=11)
    sent: list[str] = []

    class FailingProducer:
        async def send_and_wait(self, topic: str, value: bytes, **_: Any) -> None:
            event_id = orjson.loads(value)["event_id"]
            sent.append(event_id)
            if event_id == "settled":  # the expert's verdict is read while this send is out
                sweeper.observe(tp, _probe_verdict("settled", "c-settled").model_copy(update={"source": "expert"}))
            if event_id == "moved":
                sweeper.revoked({other})
            raise ConnectionError("broker away")

    sweeper._producer = FailingProducer()  # type: ignore[assignment]
    assert await sweeper.sweep_once() == 0
    assert sorted(sent) == ["late", "moved", "settled"]
    assert [p.verdict.event_id for p, _ in sweeper.due()] == ["late"], "only the unsettled one is tried again"


def test_the_lookback_does_not_count_a_refusal_the_live_alerter_counted_already() -> None:
    from aiokafka import ConsumerRecord

    from worker.decode import decode_verdict
    from worker.signing import SignatureError

    metrics = AlerterMetrics()
    signer = Signer.from_config(signing_config(), "guard", verifies=("worker", "guard"),
                                refusals=metrics.signature_refusals)
    sweeper = DelegationSweeper(GuardSettings(), metrics, signer)
    body = _probe_verdict("forged", "c-forged").to_json()
    forged = ConsumerRecord(topic="verdicts", partition=0, offset=0, timestamp=0, timestamp_type=0, key=b"c-forged",
                            value=body, checksum=None, serialized_key_size=8, serialized_value_size=len(body),
                            headers=())
    refused = metrics.signature_refusals.labels(kind="verdict", role="none", reason="missing")
    for verifier in (signer, sweeper._reverifier):  # the live alerter, then the sweeper's lookback
        with pytest.raises(SignatureError):
            decode_verdict(forged, verifier)
    assert refused._value.get() == 1
