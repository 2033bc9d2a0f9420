"""Fair order before tokenization: decoded events wait per tenant and are taken by deficit round robin on bytes.

Rendering and tokenizing cost grows with an event's bytes, and it runs on one prep thread before the tenant-fair
batcher (worker/batcher.py) ever sees the event. Taken in arrival order, one tenant's burst of large events would
hold every other tenant's events behind it. Here each tenant with waiting events gets ``quantum`` bytes of credit
per round (Shreedhar and Varghese's deficit round robin), so a tenant sending 1 MB events gets the same bytes per
round as one sending 1 KB events, and the small ones are never stuck behind the large.

A tenant also has at most ``max_in_flight_bytes`` taken and not yet ``release``d (tokenized, batched or being
scored): the rest of its events wait here, while other tenants' events keep being taken. One event is always
allowed when the tenant has nothing in flight, so an event larger than the share still goes through.

Pure logic, no clock, no asyncio; entries exist only for tenants with waiting or in-flight events.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")


class Taken(NamedTuple, Generic[T]):
    key: str
    item: T
    size: int


class FairQueue(Generic[T]):
    def __init__(self, quantum: int, max_in_flight_bytes: int) -> None:
        if quantum < 1 or max_in_flight_bytes < 1:
            raise ValueError("quantum and max_in_flight_bytes must be positive")
        self.quantum = quantum
        self.max_in_flight_bytes = max_in_flight_bytes
        self._queues: dict[str, deque[tuple[T, int]]] = {}
        self._round: deque[str] = deque()  # keys with waiting items, in round-robin order
        self._deficit: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def put(self, key: str, item: T, size: int) -> None:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            self._round.append(key)
            self._deficit[key] = 0
        queue.append((item, max(1, size)))
        self._len += 1

    def keys(self) -> int:
        """Tenants with waiting or in-flight events (what this queue holds state for)."""
        return len(self._queues.keys() | self._in_flight.keys())

    def waiting(self, key: str) -> int:
        return len(self._queues.get(key, ()))

    def crowded(self, max_waiting: int) -> list[str]:
        """The tenants with more than ``max_waiting`` events waiting."""
        return [key for key, queue in self._queues.items() if len(queue) > max_waiting]

    def items(self, key: str) -> list[T]:
        return [item for item, _ in self._queues.get(key, ())]

    def in_flight_bytes(self, key: str) -> int:
        return self._in_flight.get(key, 0)

    def _blocked(self, key: str, size: int) -> bool:
        held = self._in_flight.get(key, 0)
        return held > 0 and held + size > self.max_in_flight_bytes

    def take(self, max_items: int, max_bytes: int) -> list[Taken[T]]:
        """Up to ``max_items`` events (and about ``max_bytes``) in fair order; empty when every waiting tenant is
        at its in-flight limit."""
        out: list[Taken[T]] = []
        taken_bytes = 0
        while self._round and len(out) < max_items and taken_bytes < max_bytes:
            if all(self._blocked(k, self._queues[k][0][1]) for k in self._round):
                break
            for _ in range(len(self._round)):
                key = self._round[0]
                queue = self._queues[key]
                if self._blocked(key, queue[0][1]):
                    self._round.rotate(-1)  # no credit while blocked: waiting is not a claim on later rounds
                    continue
                self._deficit[key] += self.quantum
                while (queue and len(out) < max_items and taken_bytes < max_bytes
                       and queue[0][1] <= self._deficit[key] and not self._blocked(key, queue[0][1])):
                    item, size = queue.popleft()
                    self._deficit[key] -= size
                    self._in_flight[key] = self._in_flight.get(key, 0) + size
                    taken_bytes += size
                    self._len -= 1
                    out.append(Taken(key, item, size))
                if queue:
                    self._round.rotate(-1)
                else:
                    # An emptied queue forfeits its credit (as in DRR): idle time is not saved up.
                    self._round.popleft()
                    del self._queues[key], self._deficit[key]
                if len(out) >= max_items or taken_bytes >= max_bytes:
                    break
        return out

    def release(self, key: str, size: int) -> None:
        """A taken event is finished (its verdict or dead letter is handed over): its bytes leave the share."""
        held = self._in_flight.get(key, 0) - max(1, size)
        if held > 0:
            self._in_flight[key] = held
        else:
            self._in_flight.pop(key, None)
