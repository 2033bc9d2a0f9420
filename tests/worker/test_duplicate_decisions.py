"""At least once, a redelivered event must get the same decision: an event near the unsafe cut is scored alone,
so its score does not depend on the batch it lands in (worker/monitor.py ``_canonical_near_cut``).

Real model weights and real data; the real-broker kill -9 check is in tests/worker/test_exactly_once.py.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import torch

from probes.heads.inference import logit, sigmoid
from probes.runtime.monitor import Monitor, Scores
from tests.worker.helpers import dataset_events, new_topics, worker_settings
from worker.config import BF16_DECISION_LOGIT_MARGIN, FP32_DECISION_LOGIT_MARGIN
from worker.metrics import WorkerMetrics
from worker.monitor import MonitorHandler, decision_logit_margin


def _handler(monitor: Monitor, small_bundle: Path, cache_dir: Path, margin: float | None) -> MonitorHandler:
    s = worker_settings("127.0.0.1:9", small_bundle, cache_dir, topics=new_topics(lambda spec: None), group="g",
                        decision_logit_margin=margin)
    return MonitorHandler(s, monitor, WorkerMetrics())


def _scores(handler: MonitorHandler, rows: list[list[list[int]]], batch: list[int]) -> np.ndarray:
    part = [rows[i] for i in batch]
    flat = [r for item in part for r in item]
    groups = [k for k, item in enumerate(part) for _ in item]
    scores = handler._score(handler.monitor.collate_by_length(flat), groups, len(part), part)
    return np.asarray(scores.p_unsafe)


def test_near_cut_events_score_the_same_in_any_batch(
    monitor: Monitor, small_bundle: Path, cache_dir: Path, datasets_dir: Path
) -> None:
    events = dataset_events([datasets_dir / "xstest.jsonl", datasets_dir / "harmbench.jsonl"], 64)
    rows = monitor.tokenize_windows_batch([e.conversation() for e in events])
    # A wide margin, so most events of this small sample count as near the cut and take the canonical path.
    handler = _handler(monitor, small_bundle, cache_dir, margin=2.0)
    alone = np.array([_scores(handler, rows, [i])[0] for i in range(len(rows))])
    near = np.abs(logit(alone) - logit(monitor.unsafe_cut)) < 2.0
    assert near.sum() >= 8, "too few events near the cut to test anything"
    rng = random.Random(7)
    for _ in range(3):  # three different batch compositions and sizes
        order = list(range(len(rows)))
        rng.shuffle(order)
        size = rng.choice([5, 16, 32])
        batched = np.empty(len(rows))
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            batched[idx] = _scores(handler, rows, idx)
        # Bitwise: the duplicate of a near-cut event carries the very same score, hence the same decision.
        assert np.array_equal(batched[near], alone[near]), np.abs(batched[near] - alone[near]).max()
        assert ((batched >= monitor.unsafe_cut) == (alone >= monitor.unsafe_cut)).all()
    assert handler.metrics.canonical_rescores._value.get() > 0


def test_margin_zero_scores_each_batch_once(monitor: Monitor, small_bundle: Path, cache_dir: Path,
                                            datasets_dir: Path) -> None:
    events = dataset_events([datasets_dir / "xstest.jsonl"], 16)
    rows = monitor.tokenize_windows_batch([e.conversation() for e in events])
    handler = _handler(monitor, small_bundle, cache_dir, margin=0.0)
    _scores(handler, rows, list(range(len(rows))))
    assert handler.metrics.canonical_rescores._value.get() == 0


def test_the_margin_is_a_distance_in_logits(monitor: Monitor, small_bundle: Path, cache_dir: Path,
                                            datasets_dir: Path) -> None:
    """Batch noise moves the head's logit, not P(unsafe) by a fixed amount: near a cut of 0.99 a margin of 0.02 in P
    spans every flagged event (the demo bundle's 0.9887 sent 28 % of real traffic back for a pass of its own)."""
    events = dataset_events([datasets_dir / "xstest.jsonl"], 3)
    rows = monitor.tokenize_windows_batch([e.conversation() for e in events])
    handler = _handler(monitor, small_bundle, cache_dir, margin=0.1)
    cut = logit(monitor.unsafe_cut)
    # 0.05 and 0.3 logits above the cut (both within 0.1 of it in P, whatever the cut), and far above it.
    p = sigmoid(np.asarray([cut + 0.05, cut + 0.3, cut + 3.0]))
    assert abs(p[1] - monitor.unsafe_cut) < 0.1
    out = handler._canonical_near_cut(Scores(p.copy(), None, np.zeros(3), None), rows)
    assert handler.metrics.canonical_rescores._value.get() == 1, "only the event within 0.1 logit is scored again"
    alone = monitor.p_unsafe_of([rows[0]])[0]
    assert out.p_unsafe[0] == alone and out.p_unsafe[1:].tolist() == p[1:].tolist()


def test_a_windowed_event_forwards_again_only_the_rows_that_can_decide_it(
    monitor: Monitor, small_bundle: Path, cache_dir: Path
) -> None:
    """A row far below the cut stays below it forwarded on its own too: only the rows within the margin below the
    cut (or above it) are forwarded again, each on its own, and the event takes the highest of them."""
    from probes.conversation import single_turn

    rows = monitor.tokenize_windows_batch([single_turn("how do I keep my tomato plants alive in summer? " * 30)])
    own = rows[0]
    assert len(own) >= 4, "a conversation read in windows"
    handler = _handler(monitor, small_bundle, cache_dir, margin=0.1)
    cut = logit(monitor.unsafe_cut)
    # The event's best row sits just above the cut, one more just below it (within the margin), the rest far below.
    row_logits = np.full(len(own), cut - 5.0)
    row_logits[[1, 2]] = [cut + 0.05, cut - 0.05]
    row_p = sigmoid(row_logits)
    scores = Scores(np.asarray([row_p[1]]), None, np.zeros(1), None, row_p_unsafe=row_p)
    out = handler._canonical_near_cut(scores, rows)
    assert handler.metrics.canonical_rows._value.get() == 2
    each = [monitor.p_unsafe_of([[row]])[0] for row in own[1:3]]
    assert out.p_unsafe[0] == max(each)
    # Without the rows' scores (a scorer that does not report them), every row of the event is forwarded again.
    handler._canonical_near_cut(Scores(np.asarray([row_p[1]]), None, np.zeros(1), None), rows)
    assert handler.metrics.canonical_rows._value.get() == 2 + len(own)


def test_the_default_margin_follows_the_compute_dtype(monitor: Monitor) -> None:
    assert decision_logit_margin(None, monitor) == FP32_DECISION_LOGIT_MARGIN  # the test monitor runs in fp32
    for dtype in (torch.bfloat16, torch.float16):
        low = cast(Any, SimpleNamespace(loaded=SimpleNamespace(dtype=dtype)))
        assert decision_logit_margin(None, low) == BF16_DECISION_LOGIT_MARGIN
    assert decision_logit_margin(0.3, monitor) == 0.3 and decision_logit_margin(0.0, monitor) == 0.0
