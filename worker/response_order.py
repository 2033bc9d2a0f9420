"""Per-response chunk order: seq numbers put chunks back in order, drop duplicates, bound what waits.

Pure bookkeeping (no Kafka, no torch), so the stream handler's ordering rules are tested on their own.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

T = TypeVar("T")
Offer = Literal["ready", "buffered", "duplicate", "overflow", "too_far"]


@dataclass
class ChunkOrder(Generic[T]):
    """Chunks of one response by ``seq``: released in order from 0, each once.

    A chunk ahead of the next expected seq waits (at most ``max_pending`` of them); a seq already released or
    already waiting is a duplicate (re-delivery, producer retry) and is dropped. A seq more than ``max_pending``
    ahead is ``too_far`` and changes nothing: so chunks that may wait can never overflow, and nine chunks with
    far-ahead seqs cannot close someone else's response.
    """

    max_pending: int
    next_seq: int = 0
    pending: dict[int, T] = field(default_factory=dict)

    def offer(self, seq: int, item: T) -> tuple[Offer, list[T]]:
        if seq < self.next_seq or seq in self.pending:
            return "duplicate", []
        if self.too_far(seq):
            return "too_far", []
        if seq > self.next_seq:
            if len(self.pending) >= self.max_pending:
                return "overflow", []
            self.pending[seq] = item
            return "buffered", []
        ready = [item]
        self.next_seq += 1
        while self.next_seq in self.pending:
            ready.append(self.pending.pop(self.next_seq))
            self.next_seq += 1
        return "ready", ready

    def too_far(self, seq: int) -> bool:
        return seq > self.next_seq + self.max_pending


class ClosedSet:
    """Ids of recently closed responses and why (bounded, oldest forgotten first): their late chunks are dropped."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, str] = OrderedDict()

    def add(self, key: str, reason: str = "") -> None:
        self._ids[key] = reason
        self._ids.move_to_end(key)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    def reason(self, key: str) -> str | None:
        return self._ids.get(key)
