"""KV caches of open responses: the only large per-response state of the stream scorer, bounded by bytes and count.

Losing one costs a recomputation of the prefix, never a different score.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _tensors(item)
    elif hasattr(obj, "layers"):  # transformers' DynamicCache: one DynamicLayer (keys, values) per block
        for layer in obj.layers:
            yield from _tensors([getattr(layer, "keys", None), getattr(layer, "values", None)])


def cache_nbytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(cache))


class KVStore:
    """KV caches of open responses, least recently used evicted first beyond ``max_bytes`` or ``max_entries``."""

    def __init__(self, *, max_bytes: int, max_entries: int) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> Any | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, cache: Any) -> list[str]:
        """Hold ``cache`` for ``key``; returns the keys evicted to make room (possibly ``key`` itself)."""
        self.pop(key)
        size = cache_nbytes(cache)
        self._items[key] = (cache, size)
        self.bytes += size
        evicted: list[str] = []
        while self._items and (self.bytes > self.max_bytes or len(self._items) > self.max_entries):
            old, (_, old_size) = self._items.popitem(last=False)
            self.bytes -= old_size
            self.evictions += 1
            evicted.append(old)
        return evicted

    def pop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.bytes -= item[1]
