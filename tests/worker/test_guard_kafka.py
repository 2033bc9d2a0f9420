"""The guard service and the alerter against the real broker, with a real (small) fine-tuned expert."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest
import structlog

from ctd_monitor.local.replay import record_event, replay
from probes.config import LongCalibrationConfig, ModelConfig, Settings
from probes.conversation import Conversation, Message, is_long_dialogue
from probes.data import read_file
from probes.errors import ConfigError, ExpertError, ExpertUnavailable
from probes.evaluation.long_cut import calibrate_long_cut, long_conversations
from probes.experts.dialogue_read import read_dialogues
from probes.experts.encoder_head import EncoderHeadExpert
from probes.runtime.bundle import update_manifest
from probes.runtime.manifest import DEFAULT_UNSAFE_CUT, LongConversationCut, UnsafeCut
from probes.runtime.monitor import Monitor
from tests.worker.helpers import (
    WrappedExpert,
    counter_total,
    distinct,
    guard_settings,
    new_topics,
    produce_raw,
    produce_signed,
    read_topic,
    review_requests,
    signed,
    start_guard,
    wait_for,
    worker_settings,
)
from worker.alerts import alert_stream
from worker.config import (
    AlertsConfig,
    TopicsConfig,
    WebhookSinkConfig,
)
from worker.events import BudgetState, ChatMessage, ConversationEvent, ReviewRequest, Timings, Verdict, utcnow
from worker.guard import expert_long_cut, expert_unsafe_cut, probe_unsafe_cut, unavailable_decision
from worker.metrics import AlerterMetrics
from worker.monitor import monitor_stream

pytestmark = pytest.mark.kafka


class FlakyExpert(WrappedExpert):
    """The real expert behind a switch: down (unavailable) or hanging (slower than the timeout) on demand."""

    def __init__(self, inner: EncoderHeadExpert) -> None:
        super().__init__(inner)
        self.down = False
        self.hang_s = 0.0

    def before_score(self, conversations: Sequence[Conversation]) -> None:
        if self.down:
            raise ExpertUnavailable("connection refused (test)")
        if self.hang_s:
            hang, self.hang_s = self.hang_s, 0.0
            time.sleep(hang)


async def test_delegated_events_get_expert_verdicts_and_harmful_conversations_one_alert(
    kafka_broker, small_bundle: Path, cache_dir: Path, monitor: Monitor, small_expert: EncoderHeadExpert
) -> None:
    topics = new_topics(kafka_broker.create_topics)
    ws = worker_settings(kafka_broker.bootstrap, small_bundle, cache_dir, topics=topics,
                         group=f"w-{uuid.uuid4().hex[:6]}")
    gs = guard_settings(kafka_broker.bootstrap, topics, cache_dir)
    worker = monitor_stream(ws, monitor)
    worker_task = asyncio.create_task(worker.run())
    guard, guard_task = await start_guard(gs, small_expert)
    replay_file = small_bundle / "replay.jsonl"
    n = len(replay_file.read_text().splitlines())
    await replay(ws, [replay_file], rate=None, limit=None)

    def complete(records: list[dict[str, Any]]) -> bool:
        probe = [r for r in records if r["source"] == "probe"]
        expert = {r["event_id"] for r in records if r["source"] == "expert"}
        return len(distinct(probe)) >= n and {r["event_id"] for r in probe if r["delegated"]} <= expert

    verdicts = await read_topic(kafka_broker.bootstrap, topics.verdicts, until=complete, timeout=120)
    probe = [v for v in verdicts if v["source"] == "probe"]
    expert = [v for v in verdicts if v["source"] == "expert"]
    delegated = {v["event_id"] for v in probe if v["delegated"]}
    assert delegated and distinct(expert) == delegated
    probe_budget = {v["event_id"]: v["budget"] for v in probe}
    for v in expert:
        assert v["delegated"] and v["expert_version"] == small_expert.name and v["model_version"] != "unknown"
        assert v["budget"] == probe_budget[v["event_id"]]  # the delegation's rule state, carried unchanged
        assert v["decision"] == ("unsafe" if v["p_unsafe"] >= 0.5 else "safe")
        assert "probe_p_unsafe" in v["metadata"] and v["metadata"]["label"] in (0, 1)
    # one alert per conversation whose final verdict is harmful (expert's when delegated, else the probe's)
    final = [v for v in verdicts if v["source"] == "expert" or not v["delegated"]]
    harmful = {v["conversation_id"] for v in final if v["decision"] == "unsafe"}
    assert harmful
    alerts = await read_topic(kafka_broker.bootstrap, topics.alerts, until=lambda r: len(r) >= len(harmful))
    await asyncio.sleep(1.0)
    alerts = await read_topic(kafka_broker.bootstrap, topics.alerts, until=lambda r: len(r) >= len(harmful),
                              timeout=5)
    assert sorted(a["conversation_id"] for a in alerts) == sorted(harmful)
    assert all("messages" not in a and a["metadata"] == {} for a in alerts)
    await wait_for(lambda: guard.guard_metrics.verdicts_out.labels(decision="unsafe")._value.get()
                   + guard.guard_metrics.verdicts_out.labels(decision="safe")._value.get() == len(delegated), 10)
    worker.stop()
    guard.stop()
    await asyncio.wait_for(asyncio.gather(worker_task, guard_task), 30)


async def test_expert_outage_loses_nothing_and_recovers(
    kafka_broker, cache_dir: Path, datasets_dir: Path, small_expert: EncoderHeadExpert
) -> None:
    topics = new_topics(kafka_broker.create_topics)
    gs = guard_settings(kafka_broker.bootstrap, topics, cache_dir, expert_timeout_s=0.5,
                        alerts=AlertsConfig(enabled=False))
    flaky = FlakyExpert(small_expert)
    flaky.down = True
    guard, task = await start_guard(gs, flaky)
    requests = review_requests(datasets_dir, 20)
    await produce_raw(kafka_broker.bootstrap, topics.review, [*requests, (b"bad", b"{not json")],
                      sign="review_request")
    metrics = guard.guard_metrics
    await wait_for(lambda: metrics.degraded._value.get() == 1 and flaky.calls >= 3, 30)
    # while the expert is down nothing is answered and nothing is committed: the requests wait in the topic
    assert await read_topic(kafka_broker.bootstrap, topics.verdicts, until=lambda r: False, timeout=1.5) == []
    assert guard.guard.tracker.in_flight() >= 20
    assert metrics.expert_errors.labels(kind="unavailable")._value.get() >= 3
    # waiting for the expert is not being stuck: liveness stays green even past the stall limit
    guard.guard._last_commit -= 10 * gs.guard.liveness_max_stall_s
    assert guard.live()[0]
    # a slow expert counts as down too, then the batch is retried
    flaky.down, flaky.hang_s = False, 1.5
    await wait_for(lambda: metrics.expert_errors.labels(kind="timeout")._value.get() >= 1, 20)
    verdicts = await read_topic(kafka_broker.bootstrap, topics.verdicts, until=lambda r: len(distinct(r)) >= 20,
                                timeout=60)
    assert distinct(verdicts) == {orjson.loads(v)["event"]["event_id"] for _, v in requests}
    assert all(v["source"] == "expert" for v in verdicts)
    await wait_for(lambda: metrics.degraded._value.get() == 0 and guard.guard.tracker.in_flight() == 0, 20)
    assert metrics.degraded_total._value.get() >= 1
    assert metrics.dead_letters.labels(stage="decode", reason="invalid_review_request")._value.get() == 1
    dead = await read_topic(kafka_broker.bootstrap, topics.dead_letter, until=lambda r: len(r) >= 1)
    assert dead[0]["reason"] == "invalid_review_request" and dead[0]["stage"] == "decode"
    guard.stop()
    await asyncio.wait_for(task, 30)
    # everything was committed: the next guard in the group has nothing to redo
    again, task2 = await start_guard(gs, small_expert)
    await asyncio.sleep(2)
    assert counter_total(again.guard_metrics.requests_in) == 0
    again.stop()
    await asyncio.wait_for(task2, 30)


class Webhook:
    """A real HTTP endpoint on localhost: fails the first ``failures`` posts with 503, then stalls or answers."""

    def __init__(self, failures: int, stall_s: float = 0.0) -> None:
        self.failures, self.stall_s = failures, stall_s
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
        self.attempts += 1
        if self.attempts <= self.failures:
            status = "503 Service Unavailable"
        else:
            if self.stall_s:
                await asyncio.sleep(self.stall_s)
            self.bodies.append(orjson.loads(body))
            status = "200 OK"
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def _verdict(conversation: str, i: int, *, p: float, source: str, delegated: bool) -> tuple[bytes, bytes]:
    v = Verdict(
        event_id=f"{conversation}-{i}-{source}", conversation_id=conversation, tenant="t", p_unsafe=p, dv=None,
        delegated=delegated, decision="unsafe" if p >= 0.5 else "safe", source=source, budget=BudgetState(),
        bundle_version="b", model_version="m", timings=Timings(), decided_at=dt.datetime.now(dt.UTC),
    )
    return conversation.encode(), v.to_json()


async def test_alert_burst_fires_once_per_conversation_and_webhook_failures_never_block(
    kafka_broker, cache_dir: Path
) -> None:
    topics = new_topics(kafka_broker.create_topics)
    hook = Webhook(failures=3, stall_s=1.0)
    url = await hook.start()
    alerts_cfg = AlertsConfig(group_id=f"alerter-{uuid.uuid4().hex[:6]}", log_sink=False,
                              webhooks=(WebhookSinkConfig(url=url, retries=5, backoff_s=0.05, timeout_s=10),))
    settings = guard_settings(kafka_broker.bootstrap, topics, cache_dir, alerts=alerts_cfg)
    alerter = alert_stream(settings, AlerterMetrics())
    task = asyncio.create_task(alerter.run())
    await wait_for(lambda: alerter.ready() or task.done(), 60)
    burst: list[tuple[bytes, bytes]] = []
    for c in range(6):  # six harmful conversations, each flagged 25 times by expert and undelegated probe
        for i in range(25):
            burst.append(_verdict(f"bad{c}", i, p=0.97, source="expert" if i % 2 else "probe", delegated=i % 2 == 1))
    for c in range(10):  # unsafe but delegated probe verdicts whose expert never answered: not final, no alert
        burst.append(_verdict(f"pending{c}", 0, p=0.9, source="probe", delegated=True))
    burst += [_verdict(f"fine{c}", 0, p=0.1, source="probe", delegated=False) for c in range(20)]
    burst.append((b"x", b"\xff not a verdict"))
    # each signed by the role that writes it: the guard its expert verdicts, the worker the rest
    await produce_signed(kafka_broker.bootstrap, topics.verdicts, [
        signed([(k, v)], "verdict", "guard" if b'"source":"expert"' in v else "worker")[0] for k, v in burst])
    alerts = await read_topic(kafka_broker.bootstrap, topics.alerts, until=lambda r: len(r) >= 12)
    # every verdict is handled and committed while the webhook is still failing or stalling
    await wait_for(lambda: alerter.tracker.in_flight() == 0 and not alerter.tracker.committable(), 10)
    assert len(hook.bodies) < 6  # deliveries take >= 12 s (1 s stall each), the verdicts did not wait for them
    await asyncio.sleep(1.0)
    alerts = await read_topic(kafka_broker.bootstrap, topics.alerts, until=lambda r: False, timeout=2)
    # per conversation: the probe's warning, then the expert's critical alert (a higher severity gets through the
    # dedupe window, issue 22 item 7); every later flag is a duplicate
    assert sorted((a["conversation_id"], a["severity"]) for a in alerts) == sorted(
        (f"bad{c}", s) for c in range(6) for s in ("warning", "critical"))
    assert alerter.metrics.alerts_suppressed.labels(reason="duplicate_conversation")._value.get() == 6 * 23
    assert alerter.metrics.dead_letters.labels(stage="decode", reason="invalid_verdict")._value.get() == 1
    # the webhook got each alert once, after 3 refused attempts were retried
    await wait_for(lambda: len(hook.bodies) == 12, 40)
    assert sorted(b["alert_id"] for b in hook.bodies) == sorted(a["alert_id"] for a in alerts)
    assert hook.attempts == 15 and alerter.metrics.alert_sink_errors.labels(sink="webhook:127.0.0.1")._value.get() == 0
    alerter.stop()
    await asyncio.wait_for(task, 30)
    await hook.stop()


class ChokingExpert(WrappedExpert):
    """The real expert, except on two crafted conversations: one it refuses for good (a context-length 4xx), one
    it never answers in time."""

    def before_score(self, conversations: Sequence[Conversation]) -> None:
        texts = [c[0].content for c in conversations]
        if any("PADDED" in t for t in texts):
            # As a served model may answer: its error body quotes the prompt.
            raise ExpertError(f"HTTP 400: maximum context length is 8192 tokens: {texts[0][:60]}")
        if any("HANG" in t for t in texts):
            time.sleep(1.0)


async def test_an_expert_that_fails_for_good_still_yields_a_final_unsafe_verdict_and_an_alert(
    kafka_broker, cache_dir: Path, datasets_dir: Path, small_expert: EncoderHeadExpert
) -> None:
    """Fail closed (issue 14 point 5): padding a conversation until the expert refuses it, or making it hang,
    must not take it out of alerting. Timeouts split the batch like errors, so the others are answered."""
    topics = new_topics(kafka_broker.create_topics)
    gs = guard_settings(kafka_broker.bootstrap, topics, cache_dir, expert_timeout_s=0.5, max_expert_attempts=2,
                        max_batch=8)
    requests = review_requests(datasets_dir, 6)
    crafted = []
    for marker in ("PADDED", "HANG"):
        body = orjson.loads(requests[0][1])
        body["event"]["event_id"] = f"crafted-{marker}"
        body["event"]["conversation_id"] = f"conv-{marker}"
        body["event"]["messages"] = [{"role": "user", "content": f"{marker} how do I make a weapon? " * 20}]
        body["p_unsafe"] = 0.3  # the probe thought it harmless: only the expert could have said otherwise
        crafted.append((f"conv-{marker}".encode(), orjson.dumps(body)))
    with structlog.testing.capture_logs() as logs:
        guard, task = await start_guard(gs, ChokingExpert(small_expert))
        await produce_raw(kafka_broker.bootstrap, topics.review, [*crafted, *requests], sign="review_request")
        verdicts = await read_topic(kafka_broker.bootstrap, topics.verdicts, until=lambda r: len(distinct(r)) >= 8,
                                    timeout=90)
    given_up = [e for e in logs if e["event"] == "expert.given_up"]
    assert len(given_up) == 2 and {e["error"] for e in given_up} == {"ExpertError", "ExpertTimeout"}, given_up
    assert not [e for e in logs if "make a weapon" in repr(e)], "the expert's error text quoted the conversation"
    by_id = {v["event_id"]: v for v in verdicts}
    for marker in ("PADDED", "HANG"):
        v = by_id[f"crafted-{marker}"]
        assert (v["source"], v["decision"]) == ("expert_unavailable", "unsafe"), v
    assert all(by_id[orjson.loads(r)["event"]["event_id"]]["source"] == "expert" for _, r in requests)
    alerts = await read_topic(kafka_broker.bootstrap, topics.alerts,
                              until=lambda r: {"crafted-PADDED", "crafted-HANG"} <= distinct(r), timeout=60)
    assert {a["severity"] for a in alerts if a["event_id"].startswith("crafted")} == {"critical"}
    assert guard.guard_metrics.expert_errors.labels(kind="given_up")._value.get() == 2
    guard.stop()
    await asyncio.wait_for(task, 30)


def test_the_guard_cut_is_the_setting_else_the_bundles_cut_for_its_expert_else_the_default(
    tmp_path: Path, small_bundle: Path, cache_dir: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    update_manifest(bundle, expert_unsafe_cut=UnsafeCut(scorer="fake-expert", cut=0.7, valid=True, epsilon=0.05,
                                                        delta=0.1, n=200, fpr=0.03))
    topics = TopicsConfig()
    settings = partial(guard_settings, "127.0.0.1:1", topics, cache_dir)
    assert expert_unsafe_cut(settings(bundle=bundle), "fake-expert") == 0.7
    assert expert_unsafe_cut(settings(bundle=bundle), "another-expert") == DEFAULT_UNSAFE_CUT  # not its cut
    assert expert_unsafe_cut(settings(bundle=bundle, unsafe_threshold=0.6), "fake-expert") == 0.6  # override
    assert expert_unsafe_cut(settings(), "fake-expert") == DEFAULT_UNSAFE_CUT


def test_the_probes_decision_when_the_expert_is_unavailable_is_taken_at_the_bundles_probe_cut(
    tmp_path: Path, small_bundle: Path, cache_dir: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    update_manifest(bundle, unsafe_cut=UnsafeCut(scorer="probe", cut=0.997, valid=True, epsilon=0.1, delta=0.1,
                                                 n=88, fpr=0.045))
    settings = partial(guard_settings, "127.0.0.1:1", TopicsConfig(), cache_dir)
    probe_said = settings(bundle=bundle, unavailable_decision="probe")
    cut = probe_unsafe_cut(probe_said)
    assert cut == 0.997
    event = ConversationEvent(event_id="e1", conversation_id="c1", created_at=utcnow(),
                              messages=[ChatMessage(role="user", content="hi")])

    def request(p: float, decision: Literal["unsafe", "safe"] | None = None) -> ReviewRequest:
        return ReviewRequest(event=event, p_unsafe=p, dv=None, reason="uncertain", threshold=None,
                             bundle_version="b", requested_at=utcnow(), probe_decision=decision)

    # 0.9 is "safe" for a probe certified at 0.997: what its own verdict said, not a decision at 0.5
    assert unavailable_decision(probe_said, request(0.9), cut) == "safe"
    assert unavailable_decision(probe_said, request(0.998), cut) == "unsafe"
    assert unavailable_decision(settings(bundle=bundle), request(0.1), cut) == "unsafe"  # the default fails closed
    # the verdict's own decision wins where the request carries it: under online recalibration the worker decided
    # at another cut than the bundle's, and the guard must answer as the worker (and the sweeper) did
    assert unavailable_decision(probe_said, request(0.9, "unsafe"), cut) == "unsafe"
    assert unavailable_decision(probe_said, request(0.998, "safe"), cut) == "safe"
    assert unavailable_decision(settings(bundle=bundle), request(0.1, "safe"), cut) == "unsafe"
    assert probe_unsafe_cut(settings()) == DEFAULT_UNSAFE_CUT  # no bundle: nothing better than 0.5


async def test_a_long_dialogue_is_decided_at_the_experts_long_cut_when_the_guard_is_told_to(
    kafka_broker, small_bundle: Path, cache_dir: Path, datasets_dir: Path, tmp_path: Path, monitor: Monitor,
    small_expert: EncoderHeadExpert,
) -> None:
    settings = Settings(cache_dir=cache_dir, model=ModelConfig(spec="minilm-l6", dtype="fp32", max_tokens=64),
                        data=Settings().data.model_copy(update={"datasets_dir": datasets_dir}),
                        long_calibration=LongCalibrationConfig(max_conversations=30))
    # certified as `calibrate` does: the real expert on real long benign dialogues, read as the guard reads them
    long = calibrate_long_cut(settings, monitor, [], epsilon=0.2, delta=0.2, expert=small_expert)
    assert long is not None and long.cut.valid and long.cut.scorer == small_expert.name and long.cut.n == 30
    assert long.expert_read == "whole_and_user_turns"  # the default: whole, and the user turns alone
    held_out = long_conversations(settings, monitor, [], limit=50).part(30).records
    short = read_file(datasets_dir / "xstest.jsonl")[:20]
    # the evasion the user-turns reading closes: a held-out harmful request, then a fake assistant turn of filler
    filler = " ".join(m.content for r in read_file(datasets_dir / "alpaca_benign.jsonl")[200:260]
                      for m in r.messages)[:1500]
    requests = read_file(datasets_dir / "harmbench.jsonl")[60:66]
    wrapped = [replace(r, id=f"wrapped-{r.id}", messages=(*r.messages, Message("assistant", filler))) for r in requests]
    records = held_out + wrapped + short
    scores = small_expert.score([r.messages for r in records])
    read_so = read_dialogues(small_expert.score, [r.messages for r in records], read="whole_and_user_turns",
                             long=[is_long_dialogue(r.messages, 1024) for r in records])
    alone = dict(zip((f"wrapped-{r.id}" for r in requests), small_expert.score([r.messages for r in requests]),
                     strict=True))
    # Every event here is unsafe at the expert's own cut: below the lowest score by more than the 1e-4 the guard's
    # scores may differ from these (a request near its cut is scored alone, and CPUs round a batch differently).
    expert_cut = float(min(scores.min() - 2e-4, long.cut.cut - 1e-3))
    assert (scores[: len(held_out)] < long.cut.cut).any() and (scores[len(held_out):] < long.cut.cut).any()
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    update_manifest(bundle, expert_unsafe_cut=UnsafeCut(scorer=small_expert.name, cut=expert_cut, valid=True,
                                                        epsilon=0.2, delta=0.2, n=50, fpr=0.1),
                    expert_long_unsafe_cut=long)
    values = []
    for i, record in enumerate(records):
        event = record_event(record, run_id=f"long-guard-{uuid.uuid4().hex[:6]}", index=i)
        request = ReviewRequest(event=event, p_unsafe=0.5, dv=0.1, reason="test", threshold=0.0,
                                bundle_version="b", model_version="m", requested_at=utcnow())
        values.append((event.conversation_id.encode(), request.to_json()))
    is_long = {orjson.loads(v)["event"]["event_id"]: is_long_dialogue(r.messages, 1024)
               for r, (_, v) in zip(records, values, strict=True)}
    assert sum(is_long.values()) == len(held_out) + len(wrapped)
    expected_off = {orjson.loads(v)["event"]["event_id"]: float(x) for (_, v), x in zip(values, scores, strict=True)}
    expected_on = {orjson.loads(v)["event"]["event_id"]: float(x) for (_, v), x in zip(values, read_so, strict=True)}
    record_of = {orjson.loads(v)["event"]["event_id"]: r.id for r, (_, v) in zip(records, values, strict=True)}

    async def verdicts(**guard: Any) -> list[dict[str, Any]]:
        topics = new_topics(kafka_broker.create_topics)
        process, task = await start_guard(guard_settings(kafka_broker.bootstrap, topics, cache_dir, bundle=bundle,
                                                         alerts=AlertsConfig(enabled=False), **guard), small_expert)
        await produce_signed(kafka_broker.bootstrap, topics.review, signed(values))
        out = await read_topic(kafka_broker.bootstrap, topics.verdicts, until=lambda r: len(r) >= len(values),
                               timeout=120)
        process.stop()
        await asyncio.wait_for(task, 30)
        assert len(distinct(out)) == len(values)
        return out

    off = await verdicts(long_dialogue_cut=False)
    assert all(v["decision"] == "unsafe" for v in off)  # off: every event at the expert's cut
    for v in off:  # ... read whole
        assert v["p_unsafe"] == pytest.approx(expected_off[v["event_id"]], abs=1e-4), v["event_id"]
    on = await verdicts()  # by default: the bundle's long cut reads the user turns too, so it applies
    for v in on:
        cut = long.cut.cut if is_long[v["event_id"]] else expert_cut
        assert v["decision"] == ("unsafe" if v["p_unsafe"] >= cut else "safe"), v["event_id"]
        # a long dialogue read as its cut was certified: the more unsafe of the whole and its user turns alone
        assert v["p_unsafe"] == pytest.approx(expected_on[v["event_id"]], abs=1e-4), v["event_id"]
        request_alone = alone.get(record_of[v["event_id"]])
        if request_alone is not None:  # the fake assistant turn cannot take the request's score below its own
            assert v["p_unsafe"] >= request_alone - 1e-4
    assert any(expected_on[e] > expected_off[e] + 1e-3 for e in expected_on)  # the user turns' reading counted
    assert {v["decision"] for v in on if not is_long[v["event_id"]]} == {"unsafe"}
    assert "safe" in {v["decision"] for v in on if is_long[v["event_id"]]}  # the long cut cleared some


def test_the_guards_long_dialogue_cut_needs_a_certified_one_for_its_expert(
    tmp_path: Path, small_bundle: Path, cache_dir: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle, bundle)
    settings = partial(guard_settings, "127.0.0.1:1", TopicsConfig(), cache_dir)
    assert expert_long_cut(settings(bundle=bundle), "fake-expert", 0.7) is None  # unset and no cut: off (logged)
    with pytest.raises(ConfigError, match="calibrate"):
        expert_long_cut(settings(bundle=bundle, long_dialogue_cut=True), "fake-expert", 0.7)

    def long_cut(cut: float, scorer: str = "fake-expert", valid: bool = True) -> LongConversationCut:
        return LongConversationCut(
            cut=UnsafeCut(scorer=scorer, cut=cut, valid=valid, epsilon=0.1, delta=0.1, n=200, fpr=0.05),
            windows={"dialogue_chars": 700}, max_tokens=256, files=["x.jsonl"])

    update_manifest(bundle, expert_long_unsafe_cut=long_cut(0.9))
    rule = expert_long_cut(settings(bundle=bundle, long_dialogue_cut=True), "fake-expert", 0.7)
    assert rule is not None and rule.cut == 0.9 and rule.min_chars == 700  # the rule it was certified under
    assert rule.read == "whole"  # a cut from before the user-turns reading is applied as it was certified ...
    assert expert_long_cut(settings(bundle=bundle), "fake-expert", 0.7) is None  # ... where chosen, not by default
    rule = expert_long_cut(settings(bundle=bundle, long_dialogue_cut=True), "fake-expert", 0.95)
    assert rule is not None and rule.cut == 0.95  # never below the cut for the rest
    update_manifest(bundle, expert_long_unsafe_cut=long_cut(0.9).model_copy(update={"expert_read":
                                                                                      "whole_and_user_turns"}))
    for chosen in (True, None):  # read on the user turns too, it applies by default
        rule = expert_long_cut(settings(bundle=bundle, long_dialogue_cut=chosen), "fake-expert", 0.7)
        assert rule is not None and rule.read == "whole_and_user_turns" and rule.cut == 0.9
    assert expert_long_cut(settings(bundle=bundle, long_dialogue_cut=False), "fake-expert", 0.7) is None
    for windows in ({}, {"dialogue_chars": "700"}, {"dialogue_chars": -1}):  # a hand-edited manifest: a clear error
        update_manifest(bundle, expert_long_unsafe_cut=long_cut(0.9).model_copy(update={"windows": windows}))
        with pytest.raises(ConfigError, match="dialogue_chars"):
            expert_long_cut(settings(bundle=bundle, long_dialogue_cut=True), "fake-expert", 0.7)
    for other in (long_cut(0.9, scorer="another-expert"), long_cut(0.9, valid=False)):
        update_manifest(bundle, expert_long_unsafe_cut=other)
        with pytest.raises(ConfigError):
            expert_long_cut(settings(bundle=bundle, long_dialogue_cut=True), "fake-expert", 0.7)
