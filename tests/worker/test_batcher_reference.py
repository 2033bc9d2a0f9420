"""The per-key-queue batcher (worker/batcher.py) must cut exactly the batches the single-queue one cut.

``ReferenceBatcher`` is that single-queue batcher verbatim (before its queue was split per key so a batch costs
O(look-ahead), not O(backlog)); random schedules of adds and cuts must give the same batches and deadlines.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Generic, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.batcher import BatchLimits, MicroBatcher, Pending

T = TypeVar("T")


class ReferenceBatcher(Generic[T]):
    """The batcher as it was with one queue for all keys (O(queue) per batch): the oracle of its behaviour."""

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self._queue: deque[Pending[T]] = deque()
        self._seq = 0
        self._batches = 0
        self._last_served: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, item: T, tokens: int, now: float, key: str = "") -> None:
        self._seq += 1
        self._queue.append(Pending(item, max(1, tokens), now, self._seq, key))

    def _fair_window(self) -> tuple[list[Pending[T]], Pending[T]]:
        """The look-ahead window (keys interleaved round-robin, least recently served first) and the anchor."""
        by_key: dict[str, list[Pending[T]]] = {}
        for p in self._queue:
            by_key.setdefault(p.key, []).append(p)
        if len(by_key) == 1:
            return list(itertools.islice(self._queue, self.limits.lookahead)), self._queue[0]
        order = sorted(by_key, key=lambda k: (self._last_served.get(k, -1), by_key[k][0].seq))
        window: list[Pending[T]] = []
        depth = 0
        while len(window) < self.limits.lookahead:
            row = [by_key[k][depth] for k in order if depth < len(by_key[k])]
            if not row:
                break
            window.extend(row)
            depth += 1
        return window[: self.limits.lookahead], by_key[order[0]][0]

    def _full(self) -> bool:
        if min(len(self._queue), self.limits.lookahead) >= self.limits.max_items:
            return True  # without copying the window: the queue can hold thousands while a batch is in torch
        window = list(itertools.islice(self._queue, self.limits.lookahead))
        return max(p.tokens for p in window) * len(window) >= self.limits.max_batch_tokens

    def due_in(self, now: float) -> float | None:
        """Seconds until a batch must be cut (0 = now), None when nothing waits."""
        if not self._queue:
            return None
        if self._full():
            return 0.0
        return max(0.0, self._queue[0].arrived + self.limits.max_wait_s - now)

    def next_batch(self, now: float, *, force: bool = False) -> list[Pending[T]]:
        """Cut a batch if one is due (or ``force``, e.g. when draining); empty list otherwise."""
        due = self.due_in(now)
        if due is None or (due > 0 and not force):
            return []
        window, anchor = self._fair_window()
        # The anchor's own tenant first (a fair turn is a batch of its events, not one event), then, with room
        # left, the others' items closest in length.
        own = [p for p in window if p.key == anchor.key]
        chosen, widest = self._grow(sorted(own, key=lambda p: (p.tokens, p.seq)), anchor)
        if len(own) < len(window):
            taken = {p.seq for p in chosen}
            rest = sorted((p for p in window if p.seq not in taken), key=lambda p: (abs(p.tokens - widest), p.seq))
            for candidate in rest:
                if len(chosen) >= self.limits.max_items:
                    break
                new_widest = max(widest, candidate.tokens)
                if new_widest * (len(chosen) + 1) <= self.limits.max_batch_tokens:
                    chosen.append(candidate)
                    widest = new_widest
        chosen_ids = {p.seq for p in chosen}
        self._queue = deque(p for p in self._queue if p.seq not in chosen_ids)
        self._last_served[anchor.key] = self._batches
        self._batches += 1
        waiting = {p.key for p in self._queue}
        # Only keys with waiting items are remembered: tenant names come from producers.
        self._last_served = {k: v for k, v in self._last_served.items() if k in waiting}
        return sorted(chosen, key=lambda p: p.seq)

    def _grow(self, ordered: list[Pending[T]], anchor: Pending[T]) -> tuple[list[Pending[T]], int]:
        """The run of ``ordered`` (sorted by length) around ``anchor`` that fits the limits, and its width."""
        lo = hi = ordered.index(anchor)
        widest = anchor.tokens
        while hi - lo + 1 < self.limits.max_items:
            left = ordered[lo - 1] if lo > 0 else None
            right = ordered[hi + 1] if hi + 1 < len(ordered) else None
            # Prefer the neighbour whose length is closest to the run: least padding added.
            pick_left = right is None or (left is not None and widest - left.tokens <= right.tokens - widest)
            candidate = left if pick_left else right
            if candidate is None:
                break
            new_widest = max(widest, candidate.tokens)
            if new_widest * (hi - lo + 2) > self.limits.max_batch_tokens:
                break
            widest = new_widest
            if pick_left:
                lo -= 1
            else:
                hi += 1
        return ordered[lo : hi + 1], widest

    def drain(self) -> list[Pending[T]]:
        items = list(self._queue)
        self._queue.clear()
        return items


_steps = [0.0, 0.0, 0.004, 0.013, 0.03, 0.06]  # clock steps around max_wait (0.05): deadlines matter
_ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.sampled_from(["", "a", "b", "c"]), st.integers(1, 300), st.sampled_from(_steps)),
    st.tuples(st.just("cut"), st.booleans(), st.sampled_from(_steps)),
), min_size=1, max_size=200)


@settings(max_examples=300, deadline=None)
@given(_ops, st.integers(1, 12), st.integers(1, 40), st.sampled_from([64, 400, 2000]))
def test_same_batches_and_deadlines_as_the_single_queue_batcher(
    ops: list[tuple[object, ...]], max_items: int, lookahead: int, max_batch_tokens: int
) -> None:
    limits = BatchLimits(max_batch_tokens=max_batch_tokens, max_items=max_items, max_wait_s=0.05, lookahead=lookahead)
    new: MicroBatcher[int] = MicroBatcher(limits)
    ref: ReferenceBatcher[int] = ReferenceBatcher(limits)
    now = 0.0
    for n, op in enumerate(ops):
        if op[0] == "add":
            _, key, tokens, step = op
            now += float(step)  # type: ignore[arg-type]
            for b in (new, ref):
                b.add(n, tokens, now, key=key)  # type: ignore[arg-type]
        else:
            _, force, step = op
            now += float(step)  # type: ignore[arg-type]
            assert new.due_in(now) == ref.due_in(now)
            assert [p.item for p in new.next_batch(now, force=bool(force))] == [
                p.item for p in ref.next_batch(now, force=bool(force))]
        assert len(new) == len(ref) and new.due_in(now) == ref.due_in(now)
    while len(ref):
        assert [p.item for p in new.next_batch(now, force=True)] == [p.item for p in ref.next_batch(now, force=True)]
    assert len(new) == 0 and new.due_in(now) is None


def test_the_deadline_runs_from_the_oldest_item_of_any_key() -> None:
    """After a cut, the key that came first may hold only newer items than another key's head."""
    limits = BatchLimits(max_batch_tokens=400, max_items=12, max_wait_s=0.05, lookahead=2)
    new: MicroBatcher[str] = MicroBatcher(limits)
    ref: ReferenceBatcher[str] = ReferenceBatcher(limits)
    for b in (new, ref):
        b.add("a1", 300, 0.0, key="a")
        b.add("b2", 10, 0.01, key="b")
        b.add("a3", 10, 0.03, key="a")
        assert [p.item for p in b.next_batch(0.0, force=True)] == ["a1"]  # b2 does not fit beside it
    assert new.due_in(0.02) == ref.due_in(0.02) == pytest.approx(0.04)  # from b2 (0.01), not a3 (0.03)
