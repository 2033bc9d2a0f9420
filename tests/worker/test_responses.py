"""The streamed-response handler on the stream core with in-memory Kafka fakes and real SmolLM2 weights."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import TopicPartition

from probes.activations.features import FeatureExtractor
from probes.conversation import Message
from probes.heads.inference import LinearHead
from probes.heads.token_probe import StreamSettings, TokenProbe
from probes.runtime.kv_store import KVStore
from probes.runtime.stream_scorer import Chunk, StreamScorer, StreamStep
from tests.worker.test_stream import FakeConsumer, FakeProducer, record, until
from worker.config import KafkaConfig, ResponsesConfig, WorkerSettings
from worker.events import Alert, ResponseChunk, StreamVerdict
from worker.metrics import ConsumerMetrics
from worker.response_state import ResponseCheckpoint, decode_checkpoint
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


class ListStateLog:
    """The state topic as what earlier runs and this run's in-memory producer sent to it."""

    def __init__(self, earlier: list[bytes], producer: FakeProducer) -> None:
        self.earlier, self.producer = earlier, producer
        self.read = 0

    def values(self) -> list[bytes]:
        topic = WorkerSettings().topics.response_state
        return self.earlier + [v for t, v, _ in self.producer.sent if t == topic]

    async def read_new(self) -> list[ResponseCheckpoint]:
        values = self.values()
        new, self.read = values[self.read:], len(values)
        return [c for v in new if (c := decode_checkpoint(v)) is not None]

    async def close(self) -> None:
        pass


def make(scorer: StreamScorer, log: list[bytes], *, timeout_s: float = 30.0, start: int = 0,
         checkpoint: bool = True, state: list[bytes] | None = None, **config: Any,
         ) -> tuple[Stream[ResponseHandler], FakeConsumer, FakeProducer]:
    settings = WorkerSettings(responses=ResponsesConfig(response_timeout_s=timeout_s, max_pending_chunks=4,
                                                        checkpoint=checkpoint, **config))
    consumer, producer = FakeConsumer({P0: 0}), FakeProducer(auto_ack=True)
    consumer.log[P0] = [record(P0, offset, value) for offset, value in enumerate(log)]
    consumer.position[P0] = start
    handler = ResponseHandler(settings, scorer, bundle_version="b", model_version="m",
                              state_log=ListStateLog(state or [], producer))
    limits = ServiceLimits(max_in_flight=1000, max_event_bytes=1 << 20, shutdown_deadline_s=1.0,
                           commit_interval_s=0.01, liveness_max_stall_s=60, http_port=None)
    stream = Stream(handler, kafka=KafkaConfig(), group_id="g", topic=TOPIC, dead_letter_topic="dlq", limits=limits,
                    metrics=ConsumerMetrics(), consumer=consumer, producer=producer)
    return stream, consumer, producer


def verdicts(producer: FakeProducer) -> list[StreamVerdict]:
    topic = WorkerSettings().topics.response_verdicts
    return [StreamVerdict.model_validate(orjson.loads(v)) for t, v, _ in producer.sent if t == topic]


def alerts(producer: FakeProducer) -> list[Alert]:
    topic = WorkerSettings().topics.alerts
    return [Alert.model_validate(orjson.loads(v)) for t, v, _ in producer.sent if t == topic]


def dead_reasons(producer: FakeProducer) -> list[str]:
    return [orjson.loads(v)["reason"] for t, v, _ in producer.sent if t == "dlq"]


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
    assert v.reason == "timeout" and v.decision == "stop" and v.last_seq == 1  # unscored text is never allowed
    (alert,) = alerts(producer)
    assert alert.event_id == rid and alert.source == "stream" and alert.severity == "critical"
    assert alert.metadata["stream_reason"] == "timeout"
    await until(lambda: consumer.last_commit(P0) == 2)


@pytest.mark.parametrize("checkpoint", [True, False])
async def test_redelivery_after_a_crash_resumes_to_the_same_decision(scorer: StreamScorer, checkpoint: bool) -> None:
    """Run 1 dies with a response open. With checkpoints its scored chunks were committed and run 2 resumes it
    from its checkpoint; without, they stay uncommitted and run 2 re-reads them from chunk 0."""
    reference = await clean_run(scorer)
    rid = next(r for r, v in reference.items() if v.reason == "final")  # not stopped early: needs every chunk
    full = {r: chunks(r, t, 4) for r, t in TEXTS.items()}
    log = full[rid][:2] + [c for r, cs in full.items() if r != rid for c in cs] + full[rid][2:]
    stream, consumer, producer = make(scorer, log[:-2], checkpoint=checkpoint)  # the rest not yet produced
    await run_until(stream, producer, len(TEXTS) - 1)
    assert stream.handler.open  # still open when the process went away
    committed = consumer.last_commit(P0) or 0
    if checkpoint:
        await until(lambda: consumer.last_commit(P0) == len(log) - 2)
        committed = len(log) - 2  # the open response holds nothing back
    else:
        assert committed == 0, "the open response's first chunk holds the commit back"
    earlier = stream.handler.state_log.values() if checkpoint else []  # type: ignore[union-attr]
    # A new process (no memory) reads from the committed offset, now with the rest of the response in the log.
    stream2, consumer2, producer2 = make(scorer, log, start=committed, checkpoint=checkpoint, state=earlier)
    await run_until(stream2, producer2, 1 if checkpoint else len(TEXTS))
    again = {v.response_id: v for v in verdicts(producer2)}
    assert key(again[rid]) == key(reference[rid])
    for r, v in again.items():  # re-delivered closed responses are judged the same way again
        assert key(v) == key(reference[r])
    await until(lambda: consumer2.last_commit(P0) == len(log))


async def _stopped_with_a_response_open(scorer: StreamScorer) -> tuple[
        dict[str, StreamVerdict], str, list[bytes], Stream[ResponseHandler], FakeProducer]:
    """A run stopped once the first two chunks of a response (read to its end alone) are checkpointed and
    committed: the reference verdicts, that response's id, its two chunks, the stopped stream and its producer."""
    reference = await clean_run(scorer)
    rid = next(r for r, v in reference.items() if v.reason == "final")
    own = chunks(rid, TEXTS[rid], 4)[:2]
    stream, consumer, producer = make(scorer, own)
    task = asyncio.create_task(stream.run())
    await until(lambda: consumer.last_commit(P0) == 2, timeout=300)
    stream.stop()
    await asyncio.wait_for(task, 60)
    return reference, rid, own, stream, producer


async def test_a_signed_checkpoint_that_cannot_be_resumed_ends_its_response_in_stop_with_an_alert(
        scorer: StreamScorer) -> None:
    """A checkpoint whose logits and scored tokens disagree (a bug or a version skew, not a forgery: those are
    refused before, worker/response_state.py) once made the resume raise out of ``accept`` and stopped the
    partition on every restart. The response it describes cannot be judged in full: it ends "stop" (reason
    error) with an alert, and the partition's other traffic goes on."""
    reference, rid, own, stream, _ = await _stopped_with_a_response_open(scorer)
    state = stream.handler.state_log.values()  # type: ignore[union-attr]
    broken = orjson.loads(state[-1])
    assert broken["response_id"] == rid and broken["scored"]
    broken["logits"] = broken["logits"][:-1]
    other = next(r for r in TEXTS if r != rid)
    later = chunks(other, TEXTS[other], 1)
    stream2, consumer2, producer2 = make(scorer, own + later + chunks(rid, TEXTS[rid], 4)[2:], start=2,
                                         state=[*state[:-1], orjson.dumps(broken)])
    await run_until(stream2, producer2, 2)
    got = {v.response_id: v for v in verdicts(producer2)}
    assert (got[rid].decision, got[rid].reason) == ("stop", "error")
    assert [a.event_id for a in alerts(producer2)] == [rid]
    assert key(got[other]) == key(reference[other])
    await until(lambda: consumer2.last_commit(P0) == len(own) + len(later) + 2)  # its late chunks are dropped


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


@pytest.mark.parametrize("checkpoint", [True, False])
async def test_a_revoke_releases_open_responses_unjudged(scorer: StreamScorer, checkpoint: bool) -> None:
    reference = await clean_run(scorer)
    rid = next(r for r, v in reference.items() if v.reason == "final")  # stays open on its first chunks
    stream, consumer, producer = make(scorer, chunks(rid, TEXTS[rid], 4)[:2], checkpoint=checkpoint)
    task = asyncio.create_task(stream.run())
    await until(lambda: bool(stream.handler.open) and not stream.handler.busy(), timeout=300)
    if checkpoint:
        await until(lambda: consumer.last_commit(P0) == 2)  # checkpointed: the new owner resumes from there
    await consumer.revoke({P0})
    assert not stream.handler.open and not verdicts(producer)
    assert (consumer.last_commit(P0) or 0) == (2 if checkpoint else 0)  # without: the new owner reads chunk 0
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
    await run_until(stream, producer, len(TEXTS))
    got = {v.response_id: v for v in verdicts(producer)}
    assert set(got) == set(TEXTS)
    failed = got.pop("r-bread")
    assert (failed.decision, failed.reason) == ("stop", "error")  # fails closed, with an alert
    assert [a.event_id for a in alerts(producer)] == ["r-bread"]
    for rid, v in got.items():
        assert key(v) == key(reference[rid]), rid
    assert max(sizes) == len(TEXTS)  # the three responses' chunks went into one call
    dead = [value for topic, value, _ in producer.sent if topic == "dlq"]
    assert len(dead) == 4 and all(b'"reason":"inference_error"' in d for d in dead)  # every chunk of r-bread
    await until(lambda: consumer.last_commit(P0) == len(log))


async def test_non_finite_activations_fail_their_response_closed_not_allow(
        scorer: StreamScorer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that returns NaN states for one response (the failure the monitor dead-letters as
    ``non_finite_score``): a NaN would hold the smoothed score below every threshold and end the response "allow".
    It ends "stop" with reason "error" and an alert; the others are judged as alone."""
    reference = await clean_run(scorer)
    full = {r: chunks(r, t, 4) for r, t in TEXTS.items()}
    log = [full[r][seq] for seq in range(4) for r in TEXTS]
    extractor = scorer.extractor
    flour = set(scorer.tokenizer(" flour", add_special_tokens=False)["input_ids"])  # only r-bread says it
    real = extractor.hidden_cached_batch

    def nan_for_bread(items):  # type: ignore[no-untyped-def]
        out = real(items)
        return [(states.clone().fill_(float("nan")) if flour & set(run) else states, cache)
                for (run, _), (states, cache) in zip(items, out, strict=True)]

    monkeypatch.setattr(extractor, "hidden_cached_batch", nan_for_bread)
    stream, consumer, producer = make(scorer, log)
    await run_until(stream, producer, len(TEXTS))
    got = {v.response_id: v for v in verdicts(producer)}
    failed = got.pop("r-bread")
    assert (failed.decision, failed.reason) == ("stop", "error")
    assert [a.event_id for a in alerts(producer)] == ["r-bread"]
    for rid, v in got.items():
        assert key(v) == key(reference[rid]), rid
    dead = [value for topic, value, _ in producer.sent if topic == "dlq"]
    assert len(dead) == 4 and all(b"non-finite hidden states" in d for d in dead)
    await until(lambda: consumer.last_commit(P0) == len(log))  # nothing left holding the partition


def forged(rid: str, seq: int, text: str = "x") -> bytes:
    return ResponseChunk(response_id=rid, seq=seq, text=text, final=False,
                         created_at=dt.datetime.now(dt.UTC)).to_json()


async def test_far_ahead_seqs_are_dead_lettered_and_cannot_close_the_victims_response(scorer: StreamScorer) -> None:
    """Nine chunks with far-ahead seqs among a victim's chunks: each refused alone, the victim judged as if
    they had never been sent (today's main closed it as allow, reason gap, on the ninth)."""
    reference = await clean_run(scorer)
    rid = next(r for r, v in reference.items() if v.reason == "final")
    own = chunks(rid, TEXTS[rid], 4)
    log = own[:1] + [forged(rid, 1000 + i) for i in range(9)] + own[1:]
    stream, consumer, producer = make(scorer, log)
    await run_until(stream, producer, 1)
    (v,) = verdicts(producer)
    assert key(v) == key(reference[rid])
    assert dead_reasons(producer) == ["seq_out_of_range"] * 9
    await until(lambda: consumer.last_commit(P0) == len(log))


async def test_a_missing_chunk_ends_in_stop_with_reason_gap_and_an_alert(scorer: StreamScorer) -> None:
    reference = await clean_run(scorer)
    rid = next(r for r, v in reference.items() if v.reason == "final")
    own = chunks(rid, TEXTS[rid], 4)
    stream, consumer, producer = make(scorer, [own[0], own[2], own[3]], timeout_s=0.3)  # chunk 1 never comes
    await run_until(stream, producer, 1)
    (v,) = verdicts(producer)
    assert (v.decision, v.reason, v.last_seq) == ("stop", "gap", 0)
    assert [a.metadata["stream_reason"] for a in alerts(producer)] == ["gap"]
    await until(lambda: consumer.last_commit(P0) == 3)


@pytest.mark.parametrize("limit", ["chunks", "bytes"])
async def test_a_response_past_its_limits_is_stopped_and_the_rest_dead_lettered(scorer: StreamScorer,
                                                                                limit: str) -> None:
    reference = await clean_run(scorer)
    rid = next(r for r, v in reference.items() if v.reason == "final")
    own = chunks(rid, "word " * 400, 8)  # 2000 bytes, 250 a chunk
    config = {"max_chunks_per_response": 3} if limit == "chunks" else {"max_response_bytes": 1024}
    stream, consumer, producer = make(scorer, own, **config)
    await run_until(stream, producer, 1)
    (v,) = verdicts(producer)
    assert (v.decision, v.reason) == ("stop", "limit")
    assert [a.metadata["stream_reason"] for a in alerts(producer)] == ["limit"]
    over = 4 if limit == "chunks" else 5  # the chunk past the limit closes it; the ones after are refused
    await until(lambda: dead_reasons(producer) == ["response_limit"] * (8 - over))
    await until(lambda: consumer.last_commit(P0) == len(own))


async def test_a_response_longer_than_max_read_tokens_is_stopped_with_an_alert_never_allowed(
        scorer: StreamScorer) -> None:
    """Past the window (64) the response is read on the rolling view; past max_read_tokens (160) nothing more is
    read, so the response ends stop/limit with a critical alert naming the token limit, not allow at its final
    chunk. Under a cap above its length the same text is read to its end."""
    text = "Water the tomatoes in the morning and pick the ripe ones every other day. " * 12  # ~190 tokens
    n = len(scorer.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert n > 160
    # No threshold: the probe never stops it, so what ends it is the limit alone.
    probe = dataclasses.replace(scorer.probe, settings=dataclasses.replace(scorer.probe.settings,
                                                                           thresholds={"ema": None}))
    capped = StreamScorer(scorer.extractor, probe, prefix_max_tokens=128, max_tokens=160)
    stream, consumer, producer = make(capped, chunks("r-long", text, 6))
    await run_until(stream, producer, 1)
    (v,) = verdicts(producer)
    assert (v.decision, v.reason, v.tokens_scored) == ("stop", "limit", 160)
    (alert,) = alerts(producer)
    assert alert.metadata["stream_reason"] == "limit" and alert.metadata["limit"] == "tokens"
    await until(lambda: consumer.last_commit(P0) == 6)
    whole = StreamScorer(scorer.extractor, probe, prefix_max_tokens=128, max_tokens=n + 8)
    stream, _, producer = make(whole, chunks("r-long", text, 6))
    await run_until(stream, producer, 1)
    (v,) = verdicts(producer)
    assert (v.decision, v.reason, v.tokens_scored) == ("allow", "final", n) and not alerts(producer)


async def test_a_response_resumed_after_its_chunks_were_committed_still_times_out_to_stop(
        scorer: StreamScorer) -> None:
    """Its chunks all committed, a restarted service has only the checkpoint: the response resumes with its
    partition and is closed (stop, alert) when no chunk comes, its verdict owed to no record in flight."""
    _, rid, own, stream, producer = await _stopped_with_a_response_open(scorer)
    assert not verdicts(producer)
    other = next(r for r in TEXTS if r != rid)
    later = chunks(other, TEXTS[other], 1)  # some other traffic on the partition after the restart
    stream2, _, producer2 = make(scorer, own + later, start=2, timeout_s=0.3,
                                         state=stream.handler.state_log.values())  # type: ignore[union-attr]
    await run_until(stream2, producer2, 2)
    got = {v.response_id: v for v in verdicts(producer2)}
    assert (got[rid].decision, got[rid].reason, got[rid].last_seq) == ("stop", "timeout", 1)
    assert [a.event_id for a in alerts(producer2)] == [rid]
