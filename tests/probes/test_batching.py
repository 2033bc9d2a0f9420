from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from probes.activations.batching import plan_batches, split_padded_tokens, split_padding


def test_token_budget_and_sorting() -> None:
    lengths = [10, 200, 30, 190, 20, 5]
    batches = plan_batches(lengths, batch_tokens=400, max_items=8)
    assert batches[0] == [1, 3]  # the two long ones together: 200 x 2 = 400
    for batch in batches:
        assert max(lengths[i] for i in batch) * len(batch) <= 400


def test_oversized_item_gets_its_own_batch() -> None:
    assert plan_batches([1000, 3], batch_tokens=100, max_items=4) == [[0], [1]]


@given(st.lists(st.integers(min_value=1, max_value=300), max_size=60), st.integers(1, 9))
def test_every_item_once_and_budget_kept(lengths: list[int], max_items: int) -> None:
    batches = plan_batches(lengths, batch_tokens=512, max_items=max_items)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= max_items
        assert len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= 512


def test_split_padding_separates_window_rows_from_a_long_row() -> None:
    lengths = [256] + [80, 90, 75] * 5 + [30]  # a windowed conversation and a short one
    groups = split_padding(lengths, min_saving=1024)
    assert [sorted(g) for g in groups] == [[0], list(range(1, 17))]  # the 30-token row saves too little alone
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert split_padding([256, 80], min_saving=1024) == [[0, 1]]  # one window: not worth a forward
    assert split_padding([100, 60, 51], min_saving=0) == [[0, 1, 2]]  # none padded to twice its length
    assert split_padding([], min_saving=1) == []


def test_split_padded_tokens_counts_each_group_at_its_longest() -> None:
    lengths = [256] + [80, 90, 75] * 5 + [30]
    assert split_padded_tokens(lengths, min_saving=1024) == 256 + 16 * 90
    assert split_padded_tokens([256, 80], min_saving=1024) == 2 * 256  # kept together: padded to the long row
    assert split_padded_tokens([7], min_saving=1024) == 7
