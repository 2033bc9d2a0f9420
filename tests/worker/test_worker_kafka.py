"""The worker against the real Kafka broker the test session starts (MiniLM bundle, real shared data)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ctd_monitor.local.replay import replay
from probes.runtime.manifest import LongConversationCut, UnsafeCut
from probes.runtime.monitor import Monitor
from tests.worker.helpers import (
    ALPHA,
    counter_total,
    distinct,
    new_topics,
    produce_raw,
    read_topic,
    spawn_worker,
    start_stream,
    wait_for,
    worker_settings,
)
from worker.config import WorkerSettings

pytestmark = pytest.mark.kafka


def _settings(kafka_broker, small_bundle: Path, cache_dir: Path, partitions: int = 3, **worker) -> WorkerSettings:
    topics = new_topics(kafka_broker.create_topics, partitions)
    return worker_settings(kafka_broker.bootstrap, small_bundle, cache_dir, topics=topics,
                           group=f"g-{uuid.uuid4().hex[:6]}", **worker)



@pytest.fixture
def probe_cut(monitor: Monitor) -> Iterator[float]:
    """A calibrated probe cut other than 0.5 on the shared monitor, for one test."""
    original = monitor.bundle.manifest
    monitor.bundle.manifest = original.replace(unsafe_cut=UnsafeCut(
        scorer="probe", cut=0.3, valid=True, epsilon=0.05, delta=0.1, n=100, fpr=0.04))
    yield monitor.unsafe_cut
    monitor.bundle.manifest = original


async def test_every_event_gets_one_verdict_and_delegated_ones_a_review(
    kafka_broker, small_bundle: Path, cache_dir: Path, monitor: Monitor, datasets_dir: Path, probe_cut: float
) -> None:
    s = _settings(kafka_broker, small_bundle, cache_dir)
    worker, task = await start_stream(s, monitor)
    replay_file = small_bundle / "replay.jsonl"
    n = len(replay_file.read_text().splitlines())
    assert n >= 30
    result = await replay(s, [replay_file], rate=None, limit=None)
    verdicts = await read_topic(s.kafka.bootstrap_servers, s.topics.verdicts, until=lambda r: len(distinct(r)) >= n)
    assert len(distinct(verdicts)) == n == result["events"]
    delegated = {v["event_id"] for v in verdicts if v["delegated"]}
    reviews = await read_topic(s.kafka.bootstrap_servers, s.topics.review,
                               until=lambda r: len({x["event"]["event_id"] for x in r}) >= len(delegated), timeout=20)
    assert {r["event"]["event_id"] for r in reviews} == delegated
    budget = {v["event_id"]: v["budget"] for v in verdicts}
    assert all(r["budget"] == budget[r["event"]["event_id"]] for r in reviews)  # one Delegation, both records
    assert 0 < len(delegated) / n <= ALPHA
    for v in verdicts:
        assert v["source"] == "probe" and v["budget"]["threshold"] == monitor.rule.threshold
        assert v["delegated"] == (-abs(v["p_unsafe"] - 0.5) > v["budget"]["threshold"])
        assert probe_cut == 0.3 and v["decision"] == ("unsafe" if v["p_unsafe"] >= probe_cut else "safe")
        assert v["metadata"]["label"] in (0, 1)
    # health endpoints and metrics over HTTP
    assert worker.health is not None
    base = f"http://127.0.0.1:{worker.health.port}"
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{base}/healthz/ready")).status_code == 200
        assert (await client.get(f"{base}/healthz/live")).status_code == 200
        metrics = (await client.get(f"{base}/metrics")).text
    assert "ctd_consumer_lag" in metrics
    samples = [x for family in text_string_to_metric_families(metrics) for x in family.samples]
    # Consumed per partition (every assigned one has a series, idle or not), verdicts per tenant.
    consumed = [x for x in samples if x.name == "ctd_events_in_total"]
    assert sum(x.value for x in consumed) == n and len(consumed) == 3
    assert {(x.labels["topic"], x.labels["partition"]) for x in consumed} == {
        (s.topics.input, str(p)) for p in range(3)}  # _settings' partitions
    out = [x for x in samples if x.name == "ctd_verdicts_out_total"]
    assert sum(x.value for x in out) == n and {x.labels["tenant"] for x in out} == {v["tenant"] for v in verdicts}
    worker.stop()
    await asyncio.wait_for(task, 15)
    # everything was committed before leaving the group: a new worker in the group reads nothing again
    worker2, task2 = await start_stream(s, monitor)
    await asyncio.sleep(2)
    assert counter_total(worker2.metrics.events_in) == 0
    worker2.stop()
    await asyncio.wait_for(task2, 15)


async def test_long_dialogues_are_decided_at_the_long_cut(
    kafka_broker, small_bundle: Path, cache_dir: Path, monitor: Monitor, datasets_dir: Path
) -> None:
    """With worker.long_dialogue_cut, a long dialogue is flagged only at the bundle's long-conversation cut too
    (probes/evaluation/long_cut.py); a conversation that fits, and a long prompt alone, keep the probe's cut.
    Real conversations of the shared data."""
    from probes.data import read_file
    from probes.evaluation.long_cut import worker_scores

    dialogues = [r for r in read_file(datasets_dir / "xstest_completions.conversations.jsonl")[:200]
                 if monitor.is_long_dialogue(r.messages)]
    prompts = [r for r in read_file(datasets_dir / "jailbreak_prompts_itw.jsonl")[:100]
               if len(monitor.tokenize_windows(r.messages)) > 1]
    short = read_file(datasets_dir / "xstest.jsonl")[0]
    p = worker_scores(monitor, monitor.tokenize_windows_batch([r.messages for r in dialogues]))
    low, high = int(np.argmin(p)), int(np.argmax(p))
    long_cut = (p[low] + p[high]) / 2  # one long dialogue below it, one at or above it
    p_prompts = worker_scores(monitor, monitor.tokenize_windows_batch([r.messages for r in prompts]))
    prompt = int(np.argmin(p_prompts))
    assert p_prompts[prompt] < long_cut  # the long cut would say "safe" to it, were it a dialogue
    chosen = {"long-low": dialogues[low], "long-high": dialogues[high], "long-prompt": prompts[prompt],
              "short": short}
    p_short = float(worker_scores(monitor, monitor.tokenize_windows_batch([short.messages]))[0])
    below = min(p[low], p_short, p_prompts[prompt]) / 2  # every event is at or above the probe's cut
    original = monitor.bundle.manifest
    cut = UnsafeCut(scorer="probe", cut=below, valid=True, epsilon=0.05, delta=0.1, n=100, fpr=0.04)
    monitor.bundle.manifest = original.replace(unsafe_cut=cut, long_unsafe_cut=LongConversationCut(
        cut=cut.model_copy(update={"cut": long_cut}), windows=monitor.windows.model_dump(mode="json"),
        max_tokens=monitor.max_tokens, files=[]))
    try:
        assert monitor.long_cut == long_cut
        s = _settings(kafka_broker, small_bundle, cache_dir, partitions=1, long_dialogue_cut=True)
        worker, task = await start_stream(s, monitor)
        await produce_raw(s.kafka.bootstrap_servers, s.topics.input, [(None, orjson.dumps({
            "event_id": name, "conversation_id": name, "created_at": "2026-01-01T00:00:00Z",
            "messages": [{"role": m.role, "content": m.content} for m in r.messages]})) for name, r in chosen.items()])
        verdicts = await read_topic(s.kafka.bootstrap_servers, s.topics.verdicts, until=lambda r: len(r) >= 4)
        decisions = {v["event_id"]: v["decision"] for v in verdicts}
        assert decisions == {"long-low": "safe", "long-high": "unsafe", "long-prompt": "unsafe", "short": "unsafe"}
        worker.stop()
        await asyncio.wait_for(task, 15)
    finally:
        monitor.bundle.manifest = original


async def test_bad_inputs_go_to_the_dead_letter_topic(
    kafka_broker, small_bundle: Path, cache_dir: Path, monitor: Monitor
) -> None:
    s = _settings(kafka_broker, small_bundle, cache_dir, partitions=1, max_event_bytes=4096)
    worker, task = await start_stream(s, monitor)

    def good(i: int) -> bytes:
        return orjson.dumps({"event_id": f"ok-{i}", "conversation_id": f"c{i}", "created_at": "2026-01-01T00:00:00Z",
                             "messages": [{"role": "user", "content": f"how do I bake bread {i}"}]})

    bad = {
        "undecodable_utf8": b"\xff\xfe\xfa",
        "invalid_json": b"{nope",
        "schema_violation": orjson.dumps({"event_id": "x"}),
        "oversize": orjson.dumps({"event_id": "big", "conversation_id": "c", "created_at": "2026-01-01T00:00:00Z",
                                  "messages": [{"role": "user", "content": "x" * 8000}]}),
        "empty_conversation": orjson.dumps({"event_id": "e", "conversation_id": "c",
                                            "created_at": "2026-01-01T00:00:00Z", "messages": []}),
    }
    values: list[tuple[bytes | None, bytes | None]] = []
    for i, raw in enumerate(bad.values()):
        values += [(b"k", good(2 * i)), (b"k", raw), (b"k", good(2 * i + 1))]
    await produce_raw(s.kafka.bootstrap_servers, s.topics.input, values)
    dlq = await read_topic(s.kafka.bootstrap_servers, s.topics.dead_letter, until=lambda r: len(r) >= len(bad))
    verdicts = await read_topic(s.kafka.bootstrap_servers, s.topics.verdicts, until=lambda r: len(distinct(r)) >= 10)
    assert {d["reason"] for d in dlq} == set(bad)
    import base64

    by_reason = {d["reason"]: d for d in dlq}
    for reason, raw in bad.items():
        assert base64.b64decode(by_reason[reason]["value_b64"]) == raw
        assert by_reason[reason]["topic"] == s.topics.input and by_reason[reason]["offset"] >= 0
    assert distinct(verdicts) == {f"ok-{i}" for i in range(10)}
    await wait_for(lambda: worker.tracker.committable() == {} and worker.tracker.in_flight() == 0, 10)
    worker.stop()
    await asyncio.wait_for(task, 15)


async def test_model_error_splits_the_batch_and_dead_letters_the_culprit(
    kafka_broker, small_bundle: Path, cache_dir: Path, monitor: Monitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _settings(kafka_broker, small_bundle, cache_dir, partitions=1)
    original = monitor.score

    def flaky(batch, **kwargs):  # the batch holding the poisoned token length fails, like an OOM on an extreme batch
        if batch.input_ids.shape[1] >= 60:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(batch, **kwargs)

    monkeypatch.setattr(monitor, "score", flaky)
    worker, task = await start_stream(s, monitor)
    values = []
    for i in range(6):
        content = "poison " * 200 if i == 3 else f"short message {i}"
        values.append((b"k", orjson.dumps({"event_id": f"m-{i}", "conversation_id": "c",
                                             "created_at": "2026-01-01T00:00:00Z",
                                             "messages": [{"role": "user", "content": content}]})))
    await produce_raw(s.kafka.bootstrap_servers, s.topics.input, values)
    verdicts = await read_topic(s.kafka.bootstrap_servers, s.topics.verdicts, until=lambda r: len(distinct(r)) >= 5)
    dlq = await read_topic(s.kafka.bootstrap_servers, s.topics.dead_letter, until=lambda r: len(r) >= 1)
    assert distinct(verdicts) == {f"m-{i}" for i in range(6) if i != 3}
    assert [d["reason"] for d in dlq] == ["inference_error"] and dlq[0]["stage"] == "inference"
    worker.stop()
    await asyncio.wait_for(task, 15)


async def test_two_workers_split_partitions_and_a_rebalance_loses_nothing(
    kafka_broker, small_bundle: Path, cache_dir: Path, monitor: Monitor, datasets_dir: Path
) -> None:
    s = _settings(kafka_broker, small_bundle, cache_dir, partitions=4)
    a, task_a = await start_stream(s, monitor)
    b, task_b = await start_stream(s, monitor)
    await wait_for(lambda: len(a._assigned) == 2 and len(b._assigned) == 2, timeout=30)
    n = 120
    replay_task = asyncio.create_task(replay(s, [datasets_dir / "xstest.jsonl"], rate=60, limit=n))
    await asyncio.sleep(0.8)
    b.stop()  # leaves mid-stream: its partitions move to a
    await asyncio.wait_for(task_b, 20)
    await replay_task
    verdicts = await read_topic(s.kafka.bootstrap_servers, s.topics.verdicts, until=lambda r: len(distinct(r)) >= n)
    assert len(distinct(verdicts)) == n
    assert len(a._assigned) == 4
    a.stop()
    await asyncio.wait_for(task_a, 20)


@pytest.mark.slow
async def test_sigkill_mid_stream_loses_no_event(
    kafka_broker, small_bundle: Path, cache_dir: Path, tmp_path: Path, datasets_dir: Path
) -> None:
    s = _settings(kafka_broker, small_bundle, cache_dir)
    n = 200
    await replay(s, [datasets_dir / "xstest.jsonl"], rate=None, limit=n)
    with spawn_worker(s, tmp_path) as proc:
        first = await read_topic(s.kafka.bootstrap_servers, s.topics.verdicts, until=lambda r: len(r) >= 20,
                                 timeout=90)
        assert len(first) >= 20
        proc.kill()
    with spawn_worker(s, tmp_path) as proc:
        verdicts = await read_topic(s.kafka.bootstrap_servers, s.topics.verdicts,
                                    until=lambda r: len(distinct(r)) >= n, timeout=120)
        proc.terminate(30)
    assert len(distinct(verdicts)) == n  # nothing lost
    # duplicates only for work that was not committed before the kill
    assert len(verdicts) - n <= 2 * 500


@pytest.mark.slow
async def test_sigterm_drains_commits_and_exits_within_the_deadline(
    kafka_broker, small_bundle: Path, cache_dir: Path, tmp_path: Path, datasets_dir: Path
) -> None:
    s = _settings(kafka_broker, small_bundle, cache_dir)
    n = 150
    await replay(s, [datasets_dir / "xstest.jsonl"], rate=None, limit=n)
    with spawn_worker(s, tmp_path) as proc:
        await read_topic(s.kafka.bootstrap_servers, s.topics.verdicts, until=lambda r: len(r) >= 10, timeout=90)
        started = time.monotonic()
        code = proc.terminate(s.worker.shutdown_deadline_s + 10)
        assert code == 0 and time.monotonic() - started < s.worker.shutdown_deadline_s + 5
    before = await read_topic(s.kafka.bootstrap_servers, s.topics.verdicts, until=lambda r: False, timeout=3)
    with spawn_worker(s, tmp_path) as proc:
        after = await read_topic(s.kafka.bootstrap_servers, s.topics.verdicts,
                                 until=lambda r: len(distinct(r)) >= n, timeout=120)
        proc.terminate(30)
    assert len(distinct(after)) == n
    # a clean drain commits everything it published: the restart re-processes nothing already verdicted
    assert len(after) == n, f"{len(after) - n} duplicates after a graceful drain ({len(before)} before restart)"


async def test_backpressure_pauses_fetching_and_liveness_turns_red_when_stuck(
    kafka_broker, small_bundle: Path, cache_dir: Path, monitor: Monitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _settings(kafka_broker, small_bundle, cache_dir, partitions=1, max_in_flight=8, liveness_max_stall_s=1.5)
    release = __import__("threading").Event()
    original = monitor.score

    def stuck(batch, **kwargs):  # the model hangs (a wedged GPU, say) until released
        release.wait(30)
        return original(batch, **kwargs)

    monkeypatch.setattr(monitor, "score", stuck)
    worker, task = await start_stream(s, monitor)
    values = [(b"k", orjson.dumps({"event_id": f"bp-{i}", "conversation_id": "c", "created_at": "2026-01-01T00:00:00Z",
                                     "messages": [{"role": "user", "content": f"message {i}"}]})) for i in range(60)]
    await produce_raw(s.kafka.bootstrap_servers, s.topics.input, values)
    await wait_for(lambda: worker.metrics.paused._value.get() == 1, timeout=20)
    assert worker.tracker.in_flight() < 2 * s.worker.max_in_flight  # bounded: one poll past the limit at most
    await asyncio.sleep(2.0)
    assert worker.health is not None
    async with httpx.AsyncClient() as client:
        live = await client.get(f"http://127.0.0.1:{worker.health.port}/healthz/live")
    assert live.status_code == 503 and "no commit" in live.text
    release.set()
    verdicts = await read_topic(s.kafka.bootstrap_servers, s.topics.verdicts, until=lambda r: len(distinct(r)) >= 60)
    assert len(distinct(verdicts)) == 60
    await wait_for(lambda: worker.live()[0], timeout=10)
    worker.stop()
    await asyncio.wait_for(task, 15)


async def test_two_workers_each_hold_the_budget_and_a_window_survives_the_rebalance(
    kafka_broker, small_bundle: Path, cache_dir: Path, monitor: Monitor, datasets_dir: Path
) -> None:
    from worker.config import BudgetConfig

    # xstest's scary-sounding prompts delegate ~40 % at the offline threshold, over the budget α = 0.35.
    budget = BudgetConfig(window=50, min_window=30, recertify_every=10, hard_cap=True, cap_burst=5)
    s = _settings(kafka_broker, small_bundle, cache_dir, partitions=4).model_copy(update={"budget": budget})
    a, task_a = await start_stream(s, monitor)
    b, task_b = await start_stream(s, monitor)
    await wait_for(lambda: len(a._assigned) == 2 and len(b._assigned) == 2, timeout=30)
    n = 160
    replay_task = asyncio.create_task(replay(s, [datasets_dir / "xstest.jsonl"], rate=60, limit=n))
    windows = a.handler.budget.windows
    await wait_for(lambda: windows.get(-1) is not None and windows[-1].recertifications > 0,
                   timeout=30)
    window = a.handler.budget.windows[-1]
    b.stop()  # b's partitions move to a; a's window (scope "worker") is not reset by the rebalance
    await asyncio.wait_for(task_b, 20)
    await wait_for(lambda: len(a._assigned) == 4, timeout=30)
    seen_at_rebalance = window.seen
    await replay_task
    verdicts = await read_topic(s.kafka.bootstrap_servers, s.topics.verdicts, until=lambda r: len(distinct(r)) >= n)
    assert len(distinct(verdicts)) == n
    await wait_for(lambda: a.tracker.in_flight() == 0, timeout=20)
    assert list(a.handler.budget.windows) == [-1] and a.handler.budget.windows[-1] is window and window.seen > seen_at_rebalance
    published = sum(counter_total(w.metrics.verdicts_out) for w in (a, b))
    assert len(verdicts) == published and window.seen + b.handler.budget.windows[-1].seen == published
    # Every verdict says how it was decided; the cap refused what the threshold alone would have delegated.
    offline = monitor.rule.threshold
    signal = [-abs(v["p_unsafe"] - 0.5) for v in verdicts]
    for v, x in zip(verdicts, signal, strict=True):
        state = v["budget"]
        assert state["offline_threshold"] == offline and state["window_rate"] is not None
        threshold = state["threshold"]
        assert threshold is None or threshold >= offline
        assert v["delegated"] <= (threshold is not None and x > threshold)
        assert not (v["delegated"] and state["cap_binding"])
    assert any(v["budget"]["window_threshold"] is not None for v in verdicts)
    assert sum(x > offline for x in signal) > ALPHA * len(verdicts)  # the offline rule alone overspends ...
    assert sum(v["delegated"] for v in verdicts) <= ALPHA * len(verdicts)  # ... the fleet does not
    hits = sum(w.metrics.registry.get_sample_value("ctd_budget_cap_hits_total") or 0 for w in (a, b))
    assert hits == sum(v["budget"]["cap_binding"] for v in verdicts) > 0
    a.stop()
    await asyncio.wait_for(task_a, 20)
