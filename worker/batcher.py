"""Token-budget micro-batching with a length-sorted look-ahead (TEI's max-batch-tokens, Triton's max delay).

Padded cost of a batch is longest x count. A batch always contains the oldest waiting item (no starvation)
and grows around it through the look-ahead window sorted by length, so similar lengths share a batch.
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


class MicroBatcher(Generic[T]):
    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self._queue: deque[Pending[T]] = deque()
        self._seq = 0

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, item: T, tokens: int, now: float) -> None:
        self._seq += 1
        self._queue.append(Pending(item, max(1, tokens), now, self._seq))

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
        window = list(itertools.islice(self._queue, self.limits.lookahead))
        ordered = sorted(window, key=lambda p: (p.tokens, p.seq))
        oldest = self._queue[0]
        lo = hi = ordered.index(oldest)
        widest = oldest.tokens
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
        chosen = ordered[lo : hi + 1]
        chosen_ids = {p.seq for p in chosen}
        self._queue = deque(p for p in self._queue if p.seq not in chosen_ids)
        return sorted(chosen, key=lambda p: p.seq)

    def drain(self) -> list[Pending[T]]:
        items = list(self._queue)
        self._queue.clear()
        return items
