"""Token-budget micro-batching with a length-sorted look-ahead (TEI's max-batch-tokens, Triton's max delay).

Padded cost of a batch is longest x count. A batch always contains one anchor item and grows around it through
the look-ahead window sorted by length, so similar lengths share a batch.

Fair across keys (tenants): the anchor is the oldest item of the key served least recently, and the look-ahead
window interleaves the keys' queues round-robin, so one tenant's flood in front of the queue cannot starve
another's events; with a single key this is exactly oldest-first (no starvation).
The class is pure logic with an injected clock: the worker drives it from its event loop.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


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


class MicroBatcher(Generic[T]):
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
