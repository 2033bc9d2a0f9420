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


def split_padding(lengths: Sequence[int], *, min_saving: int) -> list[list[int]]:
    """Indices of ``lengths`` in groups to pad (and forward) separately, longest group first.

    A row starts a new group when padding it to its group's longest row would at least double it, and the new
    group is kept only when it saves at least ``min_saving`` padded tokens (each group is one more forward pass).
    A conversation read in windows has one ``max_tokens`` row and up to 16 short ones: in one batch every window
    was padded to ``max_tokens``, about 2.5 times the tokens the rows hold on harmbench.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for index in order:
        if groups and 2 * lengths[index] > lengths[groups[-1][0]]:
            groups[-1].append(index)
        else:
            groups.append([index])
    kept: list[list[int]] = []
    for group in groups:
        if kept and len(group) * (lengths[kept[-1][0]] - lengths[group[0]]) < min_saving:
            kept[-1].extend(group)
        else:
            kept.append(group)
    return kept


def split_padded_tokens(lengths: Sequence[int], *, min_saving: int) -> int:
    """Padded tokens of ``lengths`` forwarded in their ``split_padding`` groups (each group padded to its longest)."""
    if len(lengths) == 1:
        return max(1, lengths[0])
    return sum(len(group) * max(1, lengths[group[0]]) for group in split_padding(lengths, min_saving=min_saving))
