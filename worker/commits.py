"""Per-partition commit tracking: only the contiguous prefix of finished offsets is ever committed.

Micro-batches finish out of order (length sorting reorders events; a delegated event also waits for its
review request to be acknowledged). Committing offset N+1 claims that every offset ≤ N is done, so the
committable position of a partition is the lowest offset still in flight, or one past the last seen.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)


@dataclass
class _Partition:
    pending: deque[int] = field(default_factory=deque)
    done: set[int] = field(default_factory=set)
    next_offset: int | None = None  # one past the highest offset seen
    committed: int | None = None


class CommitTracker(Generic[P]):
    """Not thread-safe by design: it lives on the event loop, like the consumer that feeds it."""

    def __init__(self) -> None:
        self._parts: dict[P, _Partition] = {}

    def track(self, partition: P, offset: int) -> bool:
        """An offset was received and is now in flight.

        Offsets of a partition arrive in increasing order unless the consumer re-seeked (after a rebalance
        it restarts from the committed offset): then the partition's state starts over and False is
        returned. Completions of the old copies still count, which is safe: their outputs were published.
        """
        part = self._parts.setdefault(partition, _Partition())
        restarted = part.next_offset is not None and offset < part.next_offset
        if restarted:
            part = self._parts[partition] = _Partition(committed=part.committed)
        part.pending.append(offset)
        part.next_offset = offset + 1
        return not restarted

    def done(self, partition: P, offset: int) -> None:
        """Every output for this offset was acknowledged by the broker (or it was dead-lettered)."""
        part = self._parts.get(partition)
        if part is None:
            return  # partition revoked meanwhile: another consumer owns it now
        part.done.add(offset)
        while part.pending and part.pending[0] in part.done:
            part.done.discard(part.pending.popleft())

    def position(self, partition: P) -> int | None:
        """The offset to commit (the next message to read after a restart), or None if nothing was seen."""
        part = self._parts.get(partition)
        if part is None or part.next_offset is None:
            return None
        return part.pending[0] if part.pending else part.next_offset

    def committable(self) -> dict[P, int]:
        """Positions that moved past the last commit."""
        out: dict[P, int] = {}
        for partition, part in self._parts.items():
            position = self.position(partition)
            if position is not None and position != part.committed:
                out[partition] = position
        return out

    def mark_committed(self, offsets: dict[P, int]) -> None:
        for partition, offset in offsets.items():
            if partition in self._parts:
                self._parts[partition].committed = offset

    def in_flight(self, partition: P | None = None) -> int:
        if partition is not None:
            part = self._parts.get(partition)
            return 0 if part is None else len(part.pending)
        return sum(len(p.pending) for p in self._parts.values())

    def forget(self, partitions: list[P] | set[P]) -> None:
        """Drop revoked partitions: their in-flight offsets will be re-read by the new owner."""
        for partition in partitions:
            self._parts.pop(partition, None)
