"""Fair order before tokenization (worker/fairqueue.py): deficit round robin on bytes, per-tenant in-flight bytes."""

from __future__ import annotations

import pytest

from worker.fairqueue import FairQueue


def test_small_events_are_not_stuck_behind_a_tenants_large_ones() -> None:
    """200 events of 50 KB from one tenant arrive before 20 of 1 KB from another: in arrival order the small
    tenant waited for 10 MB of tokenization; taken fairly it waits for about one quantum per round."""
    queue: FairQueue[str] = FairQueue(quantum=64_000, max_in_flight_bytes=1 << 40)
    for i in range(200):
        queue.put("big", f"big-{i}", 50_000)
    for i in range(20):
        queue.put("small", f"small-{i}", 1_000)
    order: list[str] = []
    while len(queue):
        order.extend(x.item for x in queue.take(max_items=16, max_bytes=1 << 20))
    last_small = max(i for i, name in enumerate(order) if name.startswith("small"))
    big_before = sum(1 for name in order[:last_small] if name.startswith("big"))
    assert big_before <= 2, f"{big_before} large events were tokenized before the small tenant's last"
    # each tenant's own events keep their order
    assert [n for n in order if n.startswith("big")] == [f"big-{i}" for i in range(200)]
    assert [n for n in order if n.startswith("small")] == [f"small-{i}" for i in range(20)]


def test_equal_bytes_per_round_whatever_the_event_size() -> None:
    """Two tenants backlogged for good, one with 100 KB events and one with 1 KB events, get the same bytes."""
    queue: FairQueue[int] = FairQueue(quantum=10_000, max_in_flight_bytes=1 << 40)
    for i in range(400):
        queue.put("large", i, 100_000)
    for i in range(40_000):
        queue.put("small", i, 1_000)
    taken = {"large": 0, "small": 0}
    for _ in range(100):
        for x in queue.take(max_items=64, max_bytes=400_000):
            taken[x.key] += x.size
    assert taken["large"] == pytest.approx(taken["small"], rel=0.1)


def test_a_tenant_past_its_in_flight_bytes_waits_without_holding_up_others() -> None:
    queue: FairQueue[str] = FairQueue(quantum=1_000_000, max_in_flight_bytes=30_000)
    for i in range(10):
        queue.put("flood", f"f{i}", 10_000)
    for i in range(5):
        queue.put("quiet", f"q{i}", 10_000)
    first = queue.take(max_items=100, max_bytes=1 << 30)
    assert [x.item for x in first if x.key == "flood"] == ["f0", "f1", "f2"]
    assert [x.item for x in first if x.key == "quiet"] == ["q0", "q1", "q2"]
    assert queue.in_flight_bytes("flood") == 30_000
    assert queue.take(max_items=100, max_bytes=1 << 30) == [], "both tenants are at their share"
    queue.release("quiet", 10_000)
    assert [x.item for x in queue.take(max_items=100, max_bytes=1 << 30)] == ["q3"], "flood still waits"
    for x in first:
        if x.key == "flood":
            queue.release("flood", x.size)
    assert [x.item for x in queue.take(max_items=100, max_bytes=1 << 30) if x.key == "flood"] == ["f3", "f4", "f5"]
    assert len(queue) == 4 + 1, "nothing was dropped: the rest still waits"


def test_an_event_larger_than_the_share_still_goes_through_alone() -> None:
    queue: FairQueue[str] = FairQueue(quantum=1_000, max_in_flight_bytes=5_000)
    queue.put("t", "huge", 50_000)
    queue.put("t", "next", 10)
    assert [x.item for x in queue.take(max_items=10, max_bytes=1 << 30)] == ["huge"]
    assert queue.take(max_items=10, max_bytes=1 << 30) == []
    queue.release("t", 50_000)
    assert [x.item for x in queue.take(max_items=10, max_bytes=1 << 30)] == ["next"]


def test_state_exists_only_for_tenants_with_waiting_or_in_flight_events() -> None:
    """Rotating names cannot grow the queue's tables: 5,000 one-off tenants leave nothing behind."""
    queue: FairQueue[int] = FairQueue(quantum=4_096, max_in_flight_bytes=1 << 20)
    for i in range(5_000):
        queue.put(f"tenant-{i}", i, 500)
        if i % 100 == 99:
            for x in queue.take(max_items=1_000, max_bytes=1 << 30):
                queue.release(x.key, x.size)
            assert queue.keys() == 0 and len(queue) == 0
