"""The streamed-response handler on the stream core with in-memory Kafka fakes and real SmolLM2 weights."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import TopicPartition

from probes.conversation import Message
from probes.features import FeatureExtractor
from probes.heads import LinearHead
from probes.stream_scorer import Chunk, KVStore, StreamScorer, StreamStep
from probes.token_probe import StreamSettings, TokenProbe
from tests.worker.test_stream import FakeConsumer, FakeProducer, record, until
from worker.config import KafkaConfig, ResponsesConfig, WorkerSettings
from worker.events import ResponseChunk, StreamVerdict
from worker.metrics import ConsumerMetrics
from worker.responses import ResponseHandler
from worker.stream import ServiceLimits, Stream

LAYER = 6
TOPIC = "responses"
P0 = TopicPartition(TOPIC, 0)
TEXTS = {
    "r-garden": "Pull weeds by hand after rain; mulch blocks light so new seedlings cannot grow.",
    "r-bread": "Mix flour, water, salt and yeast, knead for ten minutes, let it rise, then bake it hot.",
    "r-lock": "Insert a tension wrench into the lock, then rake the pins with a pick until they set.",
}
CONTEXT = [{"role": "user", "content": "Tell me how to do it."}]


def chunks(rid: str, text: str, n: int) -> list[bytes]:
    bounds = np.linspace(0, len(text), n + 1).round().astype(int).tolist()
    out = []
    for seq in range(n):
        body: dict[str, Any] = {"response_id": rid, "seq": seq, "text": text[bounds[seq]:bounds[seq + 1]],
                                "final": seq == n - 1, "created_at": dt.datetime.now(dt.UTC).isoformat()}
        if seq == 0:
            body["context"] = CONTEXT
        out.append(ResponseChunk.model_validate(body).to_json())
    return out


@pytest.fixture(scope="module")
def scorer(smollm2: Any) -> StreamScorer:
    extractor = FeatureExtractor(smollm2, layer=LAYER, max_tokens=128, batch_tokens=4096, max_items=8)
    dim = smollm2.hidden_size
    rng = np.random.default_rng(0)
    head = LinearHead(mean=np.zeros(dim, np.float32), scale=np.ones(dim, np.float32),
                      weight=(rng.normal(size=dim) / np.sqrt(dim)).astype(np.float32), bias=0.0)
    settings = StreamSettings(decay=0.8, window=4, aggregator="ema", score="peak", max_response_tokens=64,
                              holdback_tokens=2, thresholds={"ema": None}, alpha=0.1, delta=0.1)
    probe = TokenProbe.from_head(head, LAYER, settings)
    plain = StreamScorer(extractor, probe, prefix_max_tokens=128)
    # A threshold some responses cross and others do not.
    peaks = []
    for text in TEXTS.values():
        state = plain.open((Message("user", CONTEXT[0]["content"]),))
        plain.feed("x", state, text, final=True, store=KVStore(max_bytes=1 << 32, max_entries=2))
        peaks.append(state.aggregate.peak["ema"])
    low, mid, _ = sorted(peaks)
    tau = (low + mid) / 2  # far from every peak: chunking changes the logits in the 5th decimal, not the decision
    settings = StreamSettings(**{**settings.__dict__, "thresholds": {"ema": tau}})
    return StreamScorer(extractor, TokenProbe.from_head(head, LAYER, settings), prefix_max_tokens=128)


def make(scorer: StreamScorer, log: list[bytes], *, timeout_s: float = 30.0, start: int = 0,
         ) -> tuple[Stream[ResponseHandler], FakeConsumer, FakeProducer]:
    settings = WorkerSettings(responses=ResponsesConfig(response_timeout_s=timeout_s, max_pending_chunks=4))
    consumer, producer = FakeConsumer({P0: 0}), FakeProducer(auto_ack=True)
    consumer.log[P0] = [record(P0, offset, value) for offset, value in enumerate(log)]
    consumer.position[P0] = start
    handler = ResponseHandler(settings, scorer, bundle_version="b", model_version="m")
    limits = ServiceLimits(max_in_flight=1000, max_event_bytes=1 << 20, shutdown_deadline_s=1.0,
                           commit_interval_s=0.01, liveness_max_stall_s=60, http_port=None)
    stream = Stream(handler, kafka=KafkaConfig(), group_id="g", topic=TOPIC, dead_letter_topic="dlq", limits=limits,
                    metrics=ConsumerMetrics(), consumer=consumer, producer=producer)
    return stream, consumer, producer


def verdicts(producer: FakeProducer) -> list[StreamVerdict]:
    topic = WorkerSettings().topics.response_verdicts
    return [StreamVerdict.model_validate(orjson.loads(v)) for t, v, _ in producer.sent if t == topic]


def key(v: StreamVerdict) -> tuple[Any, ...]:
    # A stop is decided at its token; how far past it the stopping chunk reached depends on the chunking.
    return v.decision, v.reason, v.token_index, v.tokens_scored if v.reason == "final" else None


async def run_until(stream: Stream[ResponseHandler], producer: FakeProducer, n_verdicts: int) -> None:
    task = asyncio.create_task(stream.run())
    await until(lambda: len(verdicts(producer)) >= n_verdicts, timeout=300)
    await asyncio.sleep(0.05)
    stream.stop()
    await asyncio.wait_for(task, 60)


async def clean_run(scorer: StreamScorer) -> dict[str, StreamVerdict]:
    log = [c for rid, text in TEXTS.items() for c in chunks(rid, text, 4)]
    stream, consumer, producer = make(scorer, log)
    await run_until(stream, producer, len(TEXTS))
    assert consumer.last_commit(P0) == len(log)
    return {v.response_id: v for v in verdicts(producer)}


async def test_shuffled_and_duplicated_chunks_give_one_verdict_each_same_as_in_order(scorer: StreamScorer) -> None:
    reference = await clean_run(scorer)
    assert {v.decision for v in reference.values()} == {"stop", "allow"}  # the threshold splits them
    stop = next(v for v in reference.values() if v.decision == "stop")
    assert stop.reason == "threshold" and stop.token_index is not None
    rng = random.Random(0)
    log: list[bytes] = []
    streams = {rid: chunks(rid, text, 5) for rid, text in TEXTS.items()}
    for cs in streams.values():
        window = cs[:]
        for i in range(0, len(window) - 1, 2):  # swap neighbours: out of order by one
            window[i], window[i + 1] = window[i + 1], window[i]
        log.extend(window + [cs[rng.randrange(len(cs))]])  # and one duplicate
    rng.shuffle(log)
    stream, consumer, producer = make(scorer, log)
    await run_until(stream, producer, len(TEXTS))
    got = verdicts(producer)
    assert sorted(v.response_id for v in got) == sorted(TEXTS)  # one each, duplicates dropped
    for v in got:
        assert key(v) == key(reference[v.response_id]), v.response_id
    await until(lambda: consumer.last_commit(P0) == len(log))


async def test_a_response_whose_chunks_stop_arriving_is_closed_after_the_timeout(scorer: StreamScorer) -> None:
    reference = await clean_run(scorer)
    rid = next(r for r, v in reference.items() if v.reason == "final")  # does not stop on its first chunks
    stream, consumer, producer = make(scorer, chunks(rid, TEXTS[rid], 4)[:2], timeout_s=0.3)  # never final
    await run_until(stream, producer, 1)
    (v,) = verdicts(producer)
    assert v.reason == "timeout" and v.decision == "allow" and v.last_seq == 1
    assert consumer.last_commit(P0) == 2


async def test_redelivery_after_a_crash_rescores_from_the_prefix_to_the_same_decision(scorer: StreamScorer) -> None:
    """Run 1 dies with a response open: its chunks stay uncommitted; run 2 re-reads them from chunk 0."""
    reference = await clean_run(scorer)
    rid = next(r for r, v in reference.items() if v.reason == "final")  # not stopped early: needs every chunk
    full = {r: chunks(r, t, 4) for r, t in TEXTS.items()}
    log = full[rid][:2] + [c for r, cs in full.items() if r != rid for c in cs] + full[rid][2:]
    stream, consumer, producer = make(scorer, log[:-2])  # the open response's last chunks not yet produced
    await run_until(stream, producer, len(TEXTS) - 1)
    committed = consumer.last_commit(P0) or 0
    assert committed == 0, "the open response's first chunk holds the commit back"
    assert stream.handler.open  # still open when the process went away
    # A new process (no state) reads from the committed offset, now with the rest of the response in the log.
    stream2, consumer2, producer2 = make(scorer, log, start=committed)
    await run_until(stream2, producer2, len(TEXTS))
    again = {v.response_id: v for v in verdicts(producer2)}
    assert key(again[rid]) == key(reference[rid])
    for r, v in again.items():  # re-delivered closed responses are judged the same way again
        assert key(v) == key(reference[r])
    await until(lambda: consumer2.last_commit(P0) == len(log))


def test_chunk_schema_requires_context_on_chunk_zero_only() -> None:
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(ValueError):
        ResponseChunk(response_id="r", seq=0, text="a", created_at=now)
    with pytest.raises(ValueError):
        ResponseChunk(response_id="r", seq=1, text="a", created_at=now, context=[])
    assert ResponseChunk(response_id="r", seq=0, created_at=now, context=[]).conversation() == ()


def test_schemas_are_published(tmp_path: Path) -> None:
    from worker.events import json_schemas

    assert {"response_chunk.schema.json", "stream_verdict.schema.json"} <= set(json_schemas())


async def test_a_revoke_releases_open_responses_unjudged_and_uncommitted(scorer: StreamScorer) -> None:
    reference = await clean_run(scorer)
    rid = next(r for r, v in reference.items() if v.reason == "final")  # stays open on its first chunks
    stream, consumer, producer = make(scorer, chunks(rid, TEXTS[rid], 4)[:2])
    task = asyncio.create_task(stream.run())
    await until(lambda: bool(stream.handler.open) and not stream.handler.busy(), timeout=300)
    await consumer.revoke({P0})
    assert not stream.handler.open and not verdicts(producer)
    assert (consumer.last_commit(P0) or 0) == 0  # the new owner starts at chunk 0
    stream.stop()
    await asyncio.wait_for(task, 60)


async def test_ready_chunks_of_many_responses_share_passes_and_a_failing_one_fails_alone(
        scorer: StreamScorer, monkeypatch: pytest.MonkeyPatch) -> None:
    """All chunks fetched at once: one batched pass per round of chunks; a response whose scoring raises is
    split out of the batch and dead-lettered alone, the others get the verdicts they get one at a time."""
    reference = await clean_run(scorer)
    full = {r: chunks(r, t, 4) for r, t in TEXTS.items()}
    log = [full[r][seq] for seq in range(4) for r in TEXTS]  # interleaved, as concurrent streams arrive
    batched = StreamScorer(scorer.extractor, scorer.probe, prefix_max_tokens=scorer.prefix_max_tokens)
    real = batched.score_chunks
    sizes: list[int] = []

    def poisoned(batch: list[Chunk], *, store: KVStore) -> list[StreamStep]:
        sizes.append(len(batch))
        if any(c.key == "r-bread" for c in batch):
            raise RuntimeError("poisoned input")
        return real(batch, store=store)

    monkeypatch.setattr(batched, "score_chunks", poisoned)
    stream, consumer, producer = make(batched, log)
    await run_until(stream, producer, len(TEXTS) - 1)
    got = {v.response_id: v for v in verdicts(producer)}
    assert set(got) == set(TEXTS) - {"r-bread"}
    for rid, v in got.items():
        assert key(v) == key(reference[rid]), rid
    assert max(sizes) == len(TEXTS)  # the three responses' chunks went into one call
    dead = [value for topic, value, _ in producer.sent if topic == "dlq"]
    assert len(dead) == 4 and all(b'"reason":"inference_error"' in d for d in dead)  # every chunk of r-bread
    await until(lambda: consumer.last_commit(P0) == len(log))
