"""Token-budget micro-batching with a length-sorted look-ahead (TEI's max-batch-tokens, Triton's max delay).

Padded cost of a batch is longest x count. A batch always contains one anchor item and grows around it through
the look-ahead window sorted by length, so similar lengths share a batch.

Fair across keys (tenants): the anchor is the oldest item of the key served least recently, and the look-ahead
window interleaves the keys' queues round-robin, so one tenant's flood in front of the queue cannot starve
another's events; with a single key this is exactly oldest-first (no starvation).
The class is pure logic with an injected clock: the worker drives it from its event loop.
"""

from __future__ import annotations

import heapq
import itertools
import operator
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

_SEQ_BITS = 48  # 2.8e14 events before a sequence number reaches the token count's bits


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 8192
    max_items: int = 64
    max_wait_s: float = 0.02
    lookahead: int = 512


@dataclass
class Pending(Generic[T]):
    item: T
    tokens: int
    arrived: float
    seq: int = field(default=0)
    key: str = ""
    #: ``(tokens, seq)`` as one int, the order a cut sorts its window by: an int compares several times faster
    #: than a tuple built per item, and the window (up to ``lookahead`` items) is sorted at every cut.
    by_length: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_length = (self.tokens << _SEQ_BITS) | self.seq


_BY_LENGTH = operator.attrgetter("by_length")


class MicroBatcher(Generic[T]):
    """Each key's items in their own arrival-ordered queue, so cutting a batch costs O(look-ahead × keys), not
    O(everything queued): with a backlog of ``max_in_flight`` (thousands) waiting, rebuilding and re-grouping
    the whole queue per batch was the worker's largest per-batch cost."""

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self._queues: dict[str, deque[Pending[T]]] = {}
        self._len = 0
        self._seq = 0
        self._batches = 0
        self._last_served: dict[str, int] = {}

    def __len__(self) -> int:
        return self._len

    def add(self, item: T, tokens: int, now: float, key: str = "") -> None:
        self._seq += 1
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(Pending(item, max(1, tokens), now, self._seq, key))
        self._len += 1

    def _arrival_order(self) -> Iterator[Pending[T]]:
        """Everything queued, oldest first across keys."""
        if len(self._queues) == 1:
            return iter(next(iter(self._queues.values())))
        return heapq.merge(*self._queues.values(), key=lambda p: p.seq)

    def _oldest(self) -> Pending[T]:
        return min((q[0] for q in self._queues.values()), key=lambda p: p.seq)

    def _fair_window(self) -> tuple[list[Pending[T]], Pending[T]]:
        """The look-ahead window (keys interleaved round-robin, least recently served first) and the anchor."""
        lookahead = self.limits.lookahead
        if len(self._queues) == 1:
            queue = next(iter(self._queues.values()))
            return list(itertools.islice(queue, lookahead)), queue[0]
        # A key contributes at most ``lookahead`` items to the window: its queue beyond them is never read.
        heads = {k: list(itertools.islice(q, lookahead)) for k, q in self._queues.items()}
        order = sorted(heads, key=lambda k: (self._last_served.get(k, -1), heads[k][0].seq))
        window: list[Pending[T]] = []
        depth = 0
        while len(window) < lookahead:
            row = [heads[k][depth] for k in order if depth < len(heads[k])]
            if not row:
                break
            window.extend(row)
            depth += 1
        return window[:lookahead], heads[order[0]][0]

    def _full(self) -> bool:
        if min(self._len, self.limits.lookahead) >= self.limits.max_items:
            return True  # without copying the window: the queue can hold thousands while a batch is in torch
        window = list(itertools.islice(self._arrival_order(), self.limits.lookahead))
        return max(p.tokens for p in window) * len(window) >= self.limits.max_batch_tokens

    def due_in(self, now: float) -> float | None:
        """Seconds until a batch must be cut (0 = now), None when nothing waits."""
        if not self._len:
            return None
        if self._full():
            return 0.0
        return max(0.0, self._oldest().arrived + self.limits.max_wait_s - now)

    def next_batch(self, now: float, *, force: bool = False) -> list[Pending[T]]:
        """Cut a batch if one is due (or ``force``, e.g. when draining); empty list otherwise."""
        due = self.due_in(now)
        if due is None or (due > 0 and not force):
            return []
        window, anchor = self._fair_window()
        # The anchor's own tenant first (a fair turn is a batch of its events, not one event), then, with room
        # left, the others' items closest in length.
        own = window if len(self._queues) == 1 else [p for p in window if p.key == anchor.key]
        chosen, widest = self._grow(sorted(own, key=_BY_LENGTH), anchor)
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
        self._remove(chosen)
        self._last_served[anchor.key] = self._batches
        self._batches += 1
        # Only keys with waiting items are remembered: tenant names come from producers.
        self._last_served = {k: v for k, v in self._last_served.items() if k in self._queues}
        return sorted(chosen, key=lambda p: p.seq)

    def _remove(self, chosen: list[Pending[T]]) -> None:
        """Take ``chosen`` out of their queues; all of them lie within the first ``lookahead`` of their key's."""
        by_key: dict[str, set[int]] = {}
        for p in chosen:
            by_key.setdefault(p.key, set()).add(p.seq)
        for key, seqs in by_key.items():
            queue = self._queues[key]
            last = max(seqs)
            head: list[Pending[T]] = []
            while queue and queue[0].seq <= last:
                p = queue.popleft()
                if p.seq not in seqs:
                    head.append(p)
            queue.extendleft(reversed(head))
            if not queue:
                del self._queues[key]
        self._len -= len(chosen)

    def _grow(self, ordered: list[Pending[T]], anchor: Pending[T]) -> tuple[list[Pending[T]], int]:
        """The run of ``ordered`` (sorted by length) around ``anchor`` that fits the limits, and its width."""
        # By identity: ``list.index`` compares with the dataclass's field-by-field __eq__, items included, which
        # cost more than the rest of the cut.
        lo = hi = next(i for i, p in enumerate(ordered) if p is anchor)
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
        items = list(self._arrival_order()) if self._queues else []
        self._queues.clear()
        self._len = 0
        return items
