"""At least once, a redelivered review request must get the same expert decision: a request the in-process expert
scores near its cut is scored again in a batch of its own (worker/guard.py ``_canonical_near_cut``).

Real expert weights (the suite's small encoder-head expert) and real data; the guard's broker path is in
tests/worker/test_guard_kafka.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np

from ctd_monitor.local.replay import record_event
from probes.data import read_file
from probes.experts.base import Expert
from probes.experts.encoder_head import EncoderHeadExpert
from probes.heads.inference import logit
from tests.worker.helpers import guard_settings, new_topics
from worker.events import ReviewRequest, utcnow
from worker.guard import GuardHandler
from worker.metrics import GuardMetrics


def _requests(datasets_dir: Path, n: int) -> list[Any]:
    records = read_file(datasets_dir / "xstest.jsonl")[:n // 2] + read_file(datasets_dir / "harmbench.jsonl")[:n // 2]
    return [SimpleNamespace(body=ReviewRequest(event=record_event(r, run_id="decisions", index=i), p_unsafe=0.5,
                                               dv=0.1, reason="test", threshold=0.0, bundle_version="b",
                                               model_version="m", requested_at=utcnow()))
            for i, r in enumerate(records)]


def _handler(expert: Expert, cache_dir: Path, margin: float) -> GuardHandler:
    settings = guard_settings("127.0.0.1:9", new_topics(lambda spec: None), cache_dir, decision_logit_margin=margin)
    return GuardHandler(settings, expert, GuardMetrics())


def test_requests_near_the_cut_are_decided_on_their_score_alone(small_expert: EncoderHeadExpert, cache_dir: Path,
                                                                 datasets_dir: Path) -> None:
    requests = _requests(datasets_dir, 12)
    # The same weights in bf16, where a request's score moves with what it is batched with (in fp32 it does not).
    expert = EncoderHeadExpert(small_expert.model_dir, dtype="bf16")
    scorer = _handler(expert, cache_dir, margin=0.0)
    batched, cuts = asyncio.run(scorer._score(requests))
    alone = np.asarray([asyncio.run(scorer._score([r]))[0][0] for r in requests])
    asyncio.run(scorer.close())
    # A margin that puts about half of this sample near the expert's cut (0.5 without a bundle).
    distance = np.abs(logit(batched) - logit(cuts))
    margin = float(np.median(distance))
    near = distance < margin
    assert 3 <= near.sum() < len(requests), "the sample must hold requests on both sides of the margin"
    assert not np.array_equal(batched[near], alone[near]), "batching must move a score, or this proves nothing"
    handler = _handler(expert, cache_dir, margin=margin)
    try:
        final = asyncio.run(handler._canonical_near_cut(requests, batched, cuts))
        assert np.array_equal(final[near], alone[near]), "a near request carries its score alone, bitwise"
        assert np.array_equal(final[~near], batched[~near]), "a request far from the cut keeps its batch score"
        assert handler.metrics.canonical_rescores._value.get() == near.sum()
        # Alone in its batch, a request is already in that form: nothing is scored twice.
        asyncio.run(handler._canonical_near_cut(requests[:1], batched[:1], cuts[:1]))
        assert handler.metrics.canonical_rescores._value.get() == near.sum()
    finally:
        asyncio.run(handler.close())


def test_no_second_score_when_off_or_behind_http(small_expert: Expert, cache_dir: Path, datasets_dir: Path) -> None:
    requests = _requests(datasets_dir, 4)
    off = _handler(small_expert, cache_dir, margin=0.0)
    scores = np.full(4, 0.5)  # exactly at the cut
    assert np.array_equal(asyncio.run(off._canonical_near_cut(requests, scores, [0.5] * 4)), scores)

    class RemoteExpert:  # an OpenAI-compatible guard: its server batches as it likes, a call alone changes nothing
        name = "remote"

        async def ascore(self, conversations: Any) -> list[float]:
            raise AssertionError("not called")

        def score(self, conversations: Any) -> list[float]:
            raise AssertionError("not called")

    remote = _handler(cast(Expert, RemoteExpert()), cache_dir, margin=2.0)
    assert np.array_equal(asyncio.run(remote._canonical_near_cut(requests, scores, [0.5] * 4)), scores)
    assert remote.metrics.canonical_rescores._value.get() == 0
    for handler in (off, remote):
        asyncio.run(handler.close())


def test_the_scoring_time_of_a_batch_includes_its_re_scores(small_expert: EncoderHeadExpert, cache_dir: Path,
                                                            datasets_dir: Path) -> None:
    """A batch whose requests are near the cut is scored again, each request alone: the verdicts' ``inference_ms``
    and ``ctd_expert_latency_seconds`` count every call, not the first only."""
    pause_s = 0.2

    class SlowExpert:  # the suite's expert, each call ``pause_s`` slower
        name = small_expert.name

        def score(self, conversations: Any) -> Any:
            time.sleep(pause_s)
            return small_expert.score(conversations)

        def __getattr__(self, attribute: str) -> Any:
            return getattr(small_expert, attribute)

    handler = _handler(cast(Expert, SlowExpert()), cache_dir, margin=10.0)  # the widest margin allowed
    published: list[float] = []
    handler._publish = lambda review, score, decision, *, started, scoring_s, **_: published.append(scoring_s)  # type: ignore[method-assign]
    try:
        asyncio.run(handler._review(_requests(datasets_dir, 2)))
    finally:
        asyncio.run(handler.close())
    calls = 1 + handler.metrics.canonical_rescores._value.get()
    assert calls > 1, "a request must be near the cut, or this proves nothing"
    assert len(published) == 2 and min(published) >= calls * pause_s
    assert handler.metrics.expert_latency._sum.get() >= calls * pause_s
