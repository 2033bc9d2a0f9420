"""Token-budget batching: padded cost is max_len x n (as TEI's --max-batch-tokens), sorted by length."""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(lengths: Sequence[int], *, batch_tokens: int, max_items: int) -> list[list[int]]:
    """Group item indices into batches whose padded size (longest x count) stays within ``batch_tokens``.

    Items are taken longest first so that each batch holds similar lengths; an item longer than the
    budget on its own still gets a batch of one (it must be scored, not dropped).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    current_max = 0
    for index in order:
        length = max(1, lengths[index])
        widest = max(current_max, length)
        if current and (widest * (len(current) + 1) > batch_tokens or len(current) >= max_items):
            batches.append(current)
            current, widest = [], length
        current.append(index)
        current_max = widest
    if current:
        batches.append(current)
    return batches
