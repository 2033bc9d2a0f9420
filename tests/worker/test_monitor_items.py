"""Anything that can fail for one event after decode fails for that event alone (issue 14 point 1).

The real monitor handler (MiniLM bundle) inside the stream core, with the in-memory consumer and producer of
test_stream: a tokenizer error, a non-finite score and an output that cannot be written are each simulated for
one event of a batch; that event is dead-lettered with its stage and reason, the others get their verdicts, and
every offset is committed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import ConsumerRecord

from probes.runtime.monitor import Monitor, Scores
from tests.worker.helpers import worker_settings
from tests.worker.test_stream import P0, FakeConsumer, FakeProducer, running, stopped, until
from worker.config import TopicsConfig
from worker.events import utcnow
from worker.metrics import WorkerMetrics
from worker.monitor import monitor_stream
from worker.stream import ServiceLimits


def _event(event_id: str, text: str, **extra: Any) -> bytes:
    return orjson.dumps({"event_id": event_id, "conversation_id": f"c-{event_id}", "tenant": "t",
                         "created_at": utcnow().isoformat(), "messages": [{"role": "user", "content": text}],
                         **extra})


def _consumer(values: list[bytes]) -> FakeConsumer:
    consumer = FakeConsumer({P0: len(values)})
    consumer.log[P0] = [ConsumerRecord(topic=P0.topic, partition=0, offset=i, timestamp=0, timestamp_type=0, key=None,
                                       value=v, checksum=None, serialized_key_size=0, serialized_value_size=len(v),
                                       headers=()) for i, v in enumerate(values)]
    return consumer


async def test_one_bad_event_never_takes_its_batch_down(
    monitor: Monitor, small_bundle: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = TopicsConfig()
    settings = worker_settings("unused:9092", small_bundle, cache_dir, topics=topics, group="g",
                               max_event_bytes=1 << 20)
    values = [
        _event("ok-1", "How do I bake bread?"),
        _event("tokenizer", "TOKENIZER_BOOM please"),
        _event("nan", "a question that scores NaN"),
        _event("output", "a verdict that cannot be written"),
        _event("naive", "what time is it?", created_at="2026-11-30T12:00:00"),
        b'{"event_id": "deep", "metadata": ' + b'{"a":' * 300 + b"1" + b"}" * 300 + b"}",
        _event("ok-2", "Tell me a joke about cats."),
    ]
    consumer, producer = _consumer(values), FakeProducer(auto_ack=True)
    stream = monitor_stream(settings, monitor, WorkerMetrics())
    stream.consumer, stream.producer = consumer, producer
    stream.limits = ServiceLimits(max_in_flight=100, max_event_bytes=1 << 20, shutdown_deadline_s=5,
                                  commit_interval_s=0.01, liveness_max_stall_s=60, http_port=None)
    handler = stream.handler

    real_tokenize = monitor.tokenize_windows

    def tokenize(conversation: Any) -> list[list[int]]:
        if "TOKENIZER_BOOM" in conversation[0].content:
            raise ValueError("chat template failed")
        return real_tokenize(conversation)

    monkeypatch.setattr(monitor, "tokenize_windows", tokenize)
    real_batch = monitor.tokenize_windows_batch

    def tokenize_batch(conversations: Any) -> list[list[list[int]]]:
        # The worker tokenizes a fetched batch in one call; a template failing on one event fails that call,
        # and the per-event path must then isolate it.
        if any("TOKENIZER_BOOM" in c[0].content for c in conversations):
            raise ValueError("chat template failed")
        return real_batch(conversations)

    monkeypatch.setattr(monitor, "tokenize_windows_batch", tokenize_batch)
    seen: list[list[str]] = []
    real_collate = handler._collate

    def collate(items: Any) -> Any:
        seen.append([i.body.event.event_id for i in items])
        return real_collate(items)

    monkeypatch.setattr(handler, "_collate", collate)
    real_score = monitor.score_grouped

    def score(batch: Any, groups: Any, n: int, **kwargs: Any) -> Scores:
        s = real_score(batch, groups, n, **kwargs)
        ids = seen[-1]
        p = np.array([math.nan if e == "nan" else v for e, v in zip(ids, s.p_unsafe, strict=True)])
        return Scores(p, s.dv, s.signal, s.features)

    monkeypatch.setattr(monitor, "score_grouped", score)

    class Signer:
        def headers_many(self, records: list[tuple[str, bytes | None, bytes]]) -> list[list[tuple[str, bytes]]]:
            # one record that cannot be signed fails its whole batch's signature: the handler must retry alone
            if any(key == b"c-output" for _, key, _ in records):
                raise TypeError("cannot serialise this verdict")
            return [[] for _ in records]

    handler.signer = Signer()  # type: ignore[assignment]
    task = await running(stream)
    await until(lambda: consumer.last_commit(P0) == len(values))
    await stopped(stream, task)
    assert not task.exception() and not stream.failed
    verdicts = {orjson.loads(v)["event_id"]: orjson.loads(v) for t, v, _ in producer.sent if t == topics.verdicts}
    letters = {orjson.loads(v)["offset"]: orjson.loads(v) for t, v, _ in producer.sent if t == topics.dead_letter}
    assert set(verdicts) == {"ok-1", "naive", "ok-2"}
    assert {o: (d["stage"], d["reason"]) for o, d in letters.items()} == {
        1: ("inference", "tokenize_error"), 2: ("inference", "non_finite_score"), 3: ("inference", "output_error"),
        5: ("decode", "metadata_too_deep"),
    }
    assert verdicts["naive"]["decision"] in ("safe", "unsafe")


def test_windowed_items_keep_batches_within_the_token_budget() -> None:
    """A windowed event's short window rows are forwarded apart from its full-length first row
    (``collate_by_length``): the batcher is told that padded cost, so batches of long conversations stay within
    ``max_batch_tokens`` as forwarded, and several long conversations share a batch (at rows × longest row, 17 × 256,
    each was a batch of its own at 8k-token batches)."""
    from probes.activations.batching import split_padding
    from probes.runtime.monitor import MIN_SPLIT_SAVING_TOKENS
    from worker.batcher import BatchLimits, MicroBatcher
    from worker.decode import decode_event
    from worker.monitor import Tokenized

    event = decode_event(_event("long", "x"))
    windowed = Tokenized(event, [[1] * 256] + [[1] * 70] * 16)
    single = Tokenized(event, [[1] * 120])
    assert windowed.tokens == 256 + 16 * 70 and single.tokens == 120
    batcher: MicroBatcher[Tokenized] = MicroBatcher(BatchLimits(max_batch_tokens=8192, max_items=64))
    for i in range(40):
        body = windowed if i % 3 == 0 else single
        batcher.add(body, body.tokens, 0.0)
    shared = 0
    while len(batcher):
        batch = [p.item for p in batcher.next_batch(1.0, force=True)]
        lengths = [len(row) for body in batch for row in body.rows]
        groups = split_padding(lengths, min_saving=MIN_SPLIT_SAVING_TOKENS)
        assert sum(len(g) * max(lengths[i] for i in g) for g in groups) <= 8192
        shared += sum(body is windowed for body in batch) > 1
    assert shared


def test_rows_forwarded_in_length_groups_score_as_in_one_batch(monitor: Monitor) -> None:
    """Short rows are forwarded apart from a long one (less padding); every conversation's scores stay those of
    its rows, whichever forward they were in."""
    from probes.conversation import single_turn

    long = monitor.tokenize(single_turn("filler words here " * 100))
    short = [monitor.tokenize(single_turn(f"question number {i}?")) for i in range(30)]
    rows = [long, *short]
    groups = [0] + [1 + i // 3 for i in range(30)]  # a long conversation, then ten of three rows each
    split = monitor.collate_by_length(rows)
    whole = monitor.collate(rows)
    assert len(split) == 2 and sum(b.padded_tokens for b in split) < whole.padded_tokens / 3
    assert sorted(i for b in split for i in b.indices) == list(range(len(rows)))
    a, b = monitor.score_grouped(split, groups, 11), monitor.score_grouped([whole], groups, 11)
    np.testing.assert_allclose(a.p_unsafe, b.p_unsafe, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a.signal, b.signal, rtol=1e-4, atol=1e-6)
    assert a.features is None and b.features is None, "activations are not kept unless asked for"
    # audit.refit=head asks for them: each conversation's row is the one its P(unsafe) was read from
    head = monitor.bundle.heads["safety"]
    for kept in (monitor.score_grouped(split, groups, 11, keep_features=True),
                 monitor.score_grouped([whole], groups, 11, keep_features=True)):
        assert kept.features is not None and kept.features.shape == (11, head.weight.size)
        np.testing.assert_allclose(head.proba(kept.features), kept.p_unsafe, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(kept.p_unsafe, a.p_unsafe, rtol=1e-4, atol=1e-6)


def test_the_long_dialogue_cut_applies_only_where_the_operator_chose_it(
    monitor: Monitor, small_bundle: Path, cache_dir: Path
) -> None:
    """Off by default: a long dialogue scoring between the probe's cut and the long cut stays "unsafe" (the cut
    would drop most harmful long dialogues, docs/method.md §6c); on, it is "safe" and a short event is unaffected."""
    from probes.runtime.manifest import LongConversationCut, UnsafeCut

    original = monitor.bundle.manifest
    cut = UnsafeCut(scorer="probe", cut=0.5, valid=True, epsilon=0.05, delta=0.1, n=100, fpr=0.04)
    monitor.bundle.manifest = original.replace(unsafe_cut=cut, long_unsafe_cut=LongConversationCut(
        cut=cut.model_copy(update={"cut": 0.9}), windows=monitor.windows.model_dump(mode="json"),
        max_tokens=monitor.max_tokens, files=[]))
    try:
        p = np.asarray([0.6, 0.6, 0.95])
        for chosen, expected in ((False, [True, True, True]), (True, [True, False, True])):
            settings = worker_settings("unused:9092", small_bundle, cache_dir, topics=TopicsConfig(), group="g",
                                       long_dialogue_cut=chosen)
            handler = monitor_stream(settings, monitor, WorkerMetrics()).handler
            _, flagged, _ = handler._probe_verdicts(p, long=[False, True, True])
            assert flagged == expected
    finally:
        monitor.bundle.manifest = original
