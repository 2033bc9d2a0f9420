"""Per-response chunk order: seq numbers put chunks back in order, drop duplicates, bound what waits.

Pure bookkeeping (no Kafka, no torch), so the stream handler's ordering rules are tested on their own.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

T = TypeVar("T")
Offer = Literal["ready", "buffered", "duplicate", "overflow"]


@dataclass
class ChunkOrder(Generic[T]):
    """Chunks of one response by ``seq``: released in order from 0, each once.

    A chunk ahead of the next expected seq waits (at most ``max_pending`` of them); a seq already released or
    already waiting is a duplicate (re-delivery, producer retry) and is dropped.
    """

    max_pending: int
    next_seq: int = 0
    pending: dict[int, T] = field(default_factory=dict)

    def offer(self, seq: int, item: T) -> tuple[Offer, list[T]]:
        if seq < self.next_seq or seq in self.pending:
            return "duplicate", []
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


class ClosedSet:
    """Ids of recently closed responses (bounded, oldest forgotten first): their late chunks are dropped."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> None:
        self._ids[key] = None
        self._ids.move_to_end(key)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._ids
