"""The responses service against the real local broker: 50 responses in chunks, one verdict each."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from ctd_monitor.local.child import WorkerProcess, write_worker_config
from probes.config import DataConfig, FeatureConfig, ModelConfig, Settings, SplitConfig, StreamConfig
from probes.data import read_file
from probes.fitting.pipeline import prepare_data, train_probe
from probes.fitting.token_train import response_label, train_token_probe
from probes.heads.token_probe import TokenProbe
from probes.runtime.kv_store import KVStore
from probes.runtime.monitor import Monitor
from probes.runtime.response_text import response_ids
from probes.runtime.stream_scorer import StreamScorer
from tests.worker.helpers import new_topics, produce_raw, read_topic, wait_for
from worker.config import KafkaConfig, ResponsesConfig, WorkerSettings
from worker.events import ResponseChunk
from worker.responses import response_stream

pytestmark = pytest.mark.kafka
N = 50


@pytest.fixture(scope="module")
def stream_bundle(tmp_path_factory: pytest.TempPathFactory, datasets_dir: Path, cache_dir: Path) -> Path:
    """SmolLM2 (two blocks): conversation probe on prompts, token probe on real responses, α = 0.3."""
    out = tmp_path_factory.mktemp("stream-bundle")
    settings = Settings(
        cache_dir=cache_dir, model=ModelConfig(spec="smollm2-135m-instruct", dtype="fp32", max_tokens=64),
        features=FeatureConfig(layer=2, pooling="mean"),
        data=DataConfig(datasets_dir=datasets_dir, files=("harmbench.jsonl", "alpaca_benign.jsonl"),
                        max_per_source=30, splits=SplitConfig(probe_train=0.5, dev=0.0, calibration=0.3,
                                                              evaluation=0.2)),
        stream=StreamConfig(files=("refusal_direction_completions.conversations.jsonl",), max_per_source=120,
                            max_response_tokens=32, train_tokens_per_response=16, alpha=0.3, delta=0.2),
    )
    train_probe(settings, out, prepared=prepare_data(settings))
    train_token_probe(settings, out)
    return out


def chunk_values(records: list[Any], n_chunks: int) -> list[tuple[bytes, bytes]]:
    """Every response cut into chunks, the responses interleaved chunk by chunk (as concurrent generations)."""
    per: list[list[tuple[bytes, bytes]]] = []
    for r in records:
        text = r.messages[-1].content[:400]
        bounds = np.linspace(0, len(text), n_chunks + 1).round().astype(int).tolist()
        out = []
        for seq in range(n_chunks):
            body: dict[str, Any] = {"response_id": r.id, "seq": seq, "text": text[bounds[seq]:bounds[seq + 1]],
                                    "final": seq == n_chunks - 1, "created_at": dt.datetime.now(dt.UTC),
                                    "metadata": {"label": response_label(r)}}
            if seq == 0:
                body["context"] = [{"role": m.role, "content": m.content} for m in r.messages[:-1]]
            out.append((r.id.encode(), ResponseChunk.model_validate(body).to_json()))
        per.append(out)
    return [c for i in range(n_chunks) for cs in per for c in cs[i:i + 1]]


def service_settings(kafka_broker: Any, stream_bundle: Path, cache_dir: Path) -> WorkerSettings:
    topics = new_topics(kafka_broker.create_topics)
    return WorkerSettings(
        cache_dir=cache_dir, model=ModelConfig(spec="smollm2-135m-instruct", dtype="fp32"),
        kafka=KafkaConfig(bootstrap_servers=kafka_broker.bootstrap, group_id="responses-test",
                          session_timeout_ms=10_000, heartbeat_interval_ms=1_000),
        topics=topics,
        responses=ResponsesConfig(bundle=stream_bundle, http_port=0, http_host="127.0.0.1", commit_interval_s=0.2,
                                  shutdown_deadline_s=10, response_timeout_s=120),
    )


def offline_decisions(monitor: Monitor, records: list[Any]) -> dict[str, int | None]:
    """Stop index (None: allowed) of each response scored offline in one piece: what any replay must give."""
    probe = TokenProbe.from_bundle(monitor.bundle)
    scorer = StreamScorer(monitor.extractor, probe, prefix_max_tokens=monitor.max_tokens)
    out: dict[str, int | None] = {}
    for r in records:
        state = scorer.open(r.messages[:-1])
        step = scorer.feed("offline", state, r.messages[-1].content[:400], final=True,
                           store=KVStore(max_bytes=1 << 32, max_entries=1))
        out[r.id] = step.stop_index
    return out


async def test_fifty_streamed_responses_get_one_verdict_each_with_stops_on_harmful(
    kafka_broker: Any, stream_bundle: Path, cache_dir: Path, datasets_dir: Path
) -> None:
    settings = service_settings(kafka_broker, stream_bundle, cache_dir)
    topics = settings.topics
    monitor = Monitor(stream_bundle, settings.model, cache_dir=cache_dir)
    records = read_file(datasets_dir / "refusal_direction_completions.conversations.jsonl")
    harmful = [r for r in records if response_label(r) == 1][: N // 2]
    benign = [r for r in records if response_label(r) == 0][: N - len(harmful)]
    chosen = harmful + benign
    service = response_stream(settings, monitor)
    task = asyncio.create_task(service.run())
    try:
        await produce_raw(kafka_broker.bootstrap, topics.responses, chunk_values(chosen, 4))  # type: ignore[arg-type]
        got = await read_topic(kafka_broker.bootstrap, topics.response_verdicts,
                               until=lambda r: len({v["response_id"] for v in r}) >= N, timeout=600)
    finally:
        service.stop()
        await asyncio.wait_for(task, 60)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for v in got:
        by_id.setdefault(v["response_id"], []).append(v)
    assert set(by_id) == {r.id for r in chosen}
    assert all(len(vs) == 1 for vs in by_id.values()), "one terminal verdict per response"
    # Each decision is the one an offline pass over the whole response gives (same probe, same tokens).
    for rid, stop_index in offline_decisions(monitor, chosen).items():
        (v,) = by_id[rid]
        assert v["decision"] == ("stop" if stop_index is not None else "allow"), rid
        assert v["token_index"] == stop_index
    stopped = {r.id for r in chosen if by_id[r.id][0]["decision"] == "stop"}
    assert stopped & {r.id for r in harmful}, "some harmful responses are stopped"
    assert len(stopped & {r.id for r in harmful}) > len(stopped & {r.id for r in benign})


def text_chunks(rid: str, context: Sequence[Any], text: str, n_chunks: int) -> list[tuple[bytes, bytes]]:
    bounds = np.linspace(0, len(text), n_chunks + 1).round().astype(int).tolist()
    out = []
    for seq in range(n_chunks):
        body: dict[str, Any] = {"response_id": rid, "seq": seq, "text": text[bounds[seq]:bounds[seq + 1]],
                                "final": seq == n_chunks - 1, "created_at": dt.datetime.now(dt.UTC)}
        if seq == 0:
            body["context"] = [{"role": m.role, "content": m.content} for m in context]
        out.append((rid.encode(), ResponseChunk.model_validate(body).to_json()))
    return out


async def test_responses_past_the_window_are_read_to_their_end_or_stopped_at_the_token_limit(
    kafka_broker: Any, stream_bundle: Path, cache_dir: Path, datasets_dir: Path
) -> None:
    """The bundle's window is 32 tokens. Harmful requests answered with benign text (~100 tokens) and then a real
    harmful completion (one the probe stops when it is the whole response) go through the service in 6 chunks
    each: every verdict is the offline rolling read's, and one that ends allowed was read to its last token (the
    service used to stop reading at 32 and allow). A response longer than max_read_tokens (256) ends stop/limit
    with an alert naming the token limit."""
    settings = service_settings(kafka_broker, stream_bundle, cache_dir)
    settings = settings.model_copy(update={"responses": settings.responses.model_copy(update={"max_read_tokens": 256})})
    topics = settings.topics
    monitor = Monitor(stream_bundle, settings.model, cache_dir=cache_dir)
    records = read_file(datasets_dir / "refusal_direction_completions.conversations.jsonl")
    benign = [r for r in records if response_label(r) == 0 and len(r.messages[-1].content) >= 600][30:60]
    probe = TokenProbe.from_bundle(monitor.bundle)
    assert probe.settings.max_response_tokens == 32
    scorer = StreamScorer(monitor.extractor, probe, prefix_max_tokens=monitor.max_tokens, max_tokens=256)

    def offline(context: Any, text: str) -> tuple[str, int | None]:
        step = scorer.feed("x", scorer.open(context), text, final=True, store=KVStore(max_bytes=1 << 32, max_entries=1))
        return "threshold" if step.stop_index is not None else "limit" if step.unread else "final", step.stop_index

    # Harmful requests whose real completion the probe stops when it is the whole response, each answered with a
    # benign preamble first (~100 tokens) and then that completion.
    harmful = [r for r in records if response_label(r) == 1][30:90]
    harmful = [r for r in harmful if offline(r.messages[:-1], r.messages[-1].content[:400])[0] == "threshold"][:10]
    preambles = {f"mixed-{i}": b.messages[-1].content[:500] for i, b in enumerate(benign[: len(harmful)])}
    cases = {rid: (h.messages[:-1], preambles[rid] + "\n\n" + h.messages[-1].content[:400])
             for rid, h in zip(preambles, harmful, strict=True)}

    # A benign response of ~300+ tokens the probe does not stop in its first 256: it ends at the token limit.
    long = next(b for b in benign[len(harmful):] if len(b.messages[-1].content) >= 1800
                and offline(b.messages[:-1], b.messages[-1].content)[0] == "limit")
    cases["too-long"] = (long.messages[:-1], long.messages[-1].content)
    expected = {rid: offline(context, text) for rid, (context, text) in cases.items()}
    values = [c for i in range(6) for rid, (context, text) in cases.items()
              for c in text_chunks(rid, context, text, 6)[i:i + 1]]
    service = response_stream(settings, monitor)
    task = asyncio.create_task(service.run())
    try:
        await produce_raw(kafka_broker.bootstrap, topics.responses, values)  # type: ignore[arg-type]
        got = await read_topic(kafka_broker.bootstrap, topics.response_verdicts,
                               until=lambda r: len({v["response_id"] for v in r}) >= len(cases), timeout=600)
        limited = sorted(rid for rid, (reason, _) in expected.items() if reason == "limit")
        alerts = await read_topic(kafka_broker.bootstrap, topics.alerts, until=lambda r: len(r) >= len(limited),
                                  timeout=60)
    finally:
        service.stop()
        await asyncio.wait_for(task, 60)
    by_id = {v["response_id"]: v for v in got}
    assert len(got) == len(cases) and set(by_id) == set(cases)
    for rid, (reason, stop_index) in expected.items():
        v = by_id[rid]
        assert (v["reason"], v["token_index"]) == (reason, stop_index), rid
        assert v["decision"] == ("allow" if reason == "final" else "stop"), rid
    assert by_id["too-long"]["reason"] == "limit" and by_id["too-long"]["tokens_scored"] == 256
    assert sorted((a["event_id"], a["metadata"]["limit"]) for a in alerts) == [(rid, "tokens") for rid in limited]
    for rid, (reason, _) in expected.items():
        if reason == "final":
            assert by_id[rid]["tokens_scored"] == len(response_ids(scorer.tokenizer, cases[rid][1])) > 3 * 32, rid
    assert any(reason == "final" for reason, _ in expected.values())


@pytest.mark.reliability
async def test_sigkill_mid_response_then_redelivery_gives_the_same_decisions(
    kafka_broker: Any, stream_bundle: Path, cache_dir: Path, datasets_dir: Path, tmp_path: Path
) -> None:
    """The service process is SIGKILLed with responses open; a new one resumes them from their checkpoints on
    the response-state topic (and re-reads the chunks no acknowledged checkpoint covered)."""
    settings = service_settings(kafka_broker, stream_bundle, cache_dir)
    topics = settings.topics
    records = read_file(datasets_dir / "refusal_direction_completions.conversations.jsonl")
    chosen = [r for r in records if response_label(r) == 1][:6] + [r for r in records if response_label(r) == 0][:6]
    values = chunk_values(chosen, 4)
    first_half = [v for v in values if orjson.loads(v[1])["seq"] < 2]
    second_half = [v for v in values if orjson.loads(v[1])["seq"] >= 2]
    config = write_worker_config(tmp_path / "responses.yaml", settings)
    child = WorkerProcess(config, tmp_path / "responses.log", command="run-responses").start()
    try:
        await wait_for(lambda: child.logged("partitions.assigned"), timeout=300)
        await produce_raw(kafka_broker.bootstrap, topics.responses, first_half)  # type: ignore[arg-type]
        with contextlib.suppress(TimeoutError):  # a harmful one stopping on its first chunks: work is under way
            await wait_for(lambda: '"response.verdict"' in child.log_tail(1 << 22), timeout=60)
        await asyncio.sleep(1.0)  # chunks of open responses scored, some of them checkpointed and committed
        assert child.kill() != 0
    finally:
        if child.running():
            child.kill()
    await produce_raw(kafka_broker.bootstrap, topics.responses, second_half)  # type: ignore[arg-type]
    with WorkerProcess(config, tmp_path / "responses.log", command="run-responses") as again:
        got = await read_topic(kafka_broker.bootstrap, topics.response_verdicts,
                               until=lambda r: len({v["response_id"] for v in r}) >= len(chosen), timeout=600)
        again.terminate(30)
    monitor = Monitor(stream_bundle, settings.model, cache_dir=cache_dir)
    expected = offline_decisions(monitor, chosen)
    for v in got:  # a stop published before the kill may come again after it: the same decision both times
        assert v["token_index"] == expected[v["response_id"]], v["response_id"]
        assert v["decision"] == ("stop" if expected[v["response_id"]] is not None else "allow")
    assert {v["response_id"] for v in got} == set(expected)
