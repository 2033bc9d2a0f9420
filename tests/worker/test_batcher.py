from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.batcher import BatchLimits, MicroBatcher


def test_waits_until_max_wait_then_flushes() -> None:
    b: MicroBatcher[str] = MicroBatcher(BatchLimits(max_batch_tokens=1000, max_items=10, max_wait_s=0.05))
    b.add("a", 10, now=0.0)
    assert b.next_batch(0.01) == []
    assert b.due_in(0.01) == 0.04
    assert [p.item for p in b.next_batch(0.06)] == ["a"]
    assert b.due_in(0.06) is None


def test_full_budget_flushes_immediately_and_groups_similar_lengths() -> None:
    b: MicroBatcher[str] = MicroBatcher(BatchLimits(max_batch_tokens=300, max_items=10, max_wait_s=10))
    for name, tokens in [("long1", 100), ("s1", 10), ("long2", 100), ("s2", 10), ("long3", 95)]:
        b.add(name, tokens, now=0.0)
    assert b.due_in(0.0) == 0.0
    first = [p.item for p in b.next_batch(0.0)]
    assert first == ["long1", "long2", "long3"]  # the oldest and its length-neighbours: 3 x 100 = 300
    rest = [p.item for p in b.next_batch(0.0, force=True)]
    assert rest == ["s1", "s2"]


def test_oldest_item_always_in_next_batch() -> None:
    b: MicroBatcher[int] = MicroBatcher(BatchLimits(max_batch_tokens=64, max_items=4, max_wait_s=0))
    b.add(0, 60, now=0.0)
    for i in range(1, 6):
        b.add(i, 5, now=0.0)
    assert [p.item for p in b.next_batch(0.0)] == [0]


@given(st.lists(st.integers(1, 200), min_size=1, max_size=80), st.integers(1, 8))
def test_every_item_exactly_once_within_limits(lengths: list[int], max_items: int) -> None:
    b: MicroBatcher[int] = MicroBatcher(BatchLimits(max_batch_tokens=400, max_items=max_items, max_wait_s=0,
                                                    lookahead=16))
    for i, n in enumerate(lengths):
        b.add(i, n, now=0.0)
    seen: list[int] = []
    while len(b):
        batch = b.next_batch(1.0)
        assert batch and len(batch) <= max_items
        assert len(batch) == 1 or max(p.tokens for p in batch) * len(batch) <= 400
        seen.extend(p.item for p in batch)
    assert sorted(seen) == list(range(len(lengths)))


def test_a_flooding_tenant_does_not_starve_another() -> None:
    """2000 events of one tenant wait in front of 10 of another: the quiet tenant's events are batched in the
    next few batches (oldest-first would serve them after the whole flood, ~250 batches later)."""
    b: MicroBatcher[str] = MicroBatcher(BatchLimits(max_batch_tokens=10_000, max_items=8, max_wait_s=0,
                                                   lookahead=512))
    for i in range(2000):
        b.add(f"flood{i}", 50 + i % 7, now=0.0, key="flood")
    for i in range(10):
        b.add(f"quiet{i}", 50, now=1.0, key="quiet")
    batches = []
    while len(b):
        batches.append([p.item for p in b.next_batch(2.0)])
    quiet_batches = [n for n, batch in enumerate(batches) if any(x.startswith("quiet") for x in batch)]
    assert quiet_batches and max(quiet_batches) <= 3, quiet_batches
    assert sorted(x for batch in batches for x in batch) == sorted(
        [f"flood{i}" for i in range(2000)] + [f"quiet{i}" for i in range(10)])
    # each tenant's own events keep their order
    flood_order = [int(x[5:]) for batch in batches for x in batch if x.startswith("flood")]
    assert flood_order[:8] == sorted(flood_order[:8])


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 60)), min_size=1, max_size=80),
       st.integers(1, 6))
def test_every_keyed_item_exactly_once(items: list[tuple[str, int]], max_items: int) -> None:
    b: MicroBatcher[int] = MicroBatcher(BatchLimits(max_batch_tokens=200, max_items=max_items, max_wait_s=0,
                                                   lookahead=16))
    for i, (key, tokens) in enumerate(items):
        b.add(i, tokens, now=0.0, key=key)
    seen: list[int] = []
    while len(b):
        batch = b.next_batch(1.0)
        assert batch and len(batch) <= max_items
        seen.extend(p.item for p in batch)
    assert sorted(seen) == list(range(len(items)))
