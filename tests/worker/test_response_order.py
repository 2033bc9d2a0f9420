from __future__ import annotations

from worker.response_order import ChunkOrder, ClosedSet


def test_chunks_are_released_in_seq_order_each_once() -> None:
    order: ChunkOrder[str] = ChunkOrder(max_pending=4)
    assert order.offer(1, "b") == ("buffered", [])
    assert order.offer(2, "c") == ("buffered", [])
    assert order.offer(0, "a") == ("ready", ["a", "b", "c"])
    assert order.offer(1, "b again") == ("duplicate", [])
    assert order.offer(4, "e") == ("buffered", [])
    assert order.offer(4, "e again") == ("duplicate", [])
    assert order.offer(3, "d") == ("ready", ["d", "e"])
    assert order.next_seq == 5 and not order.pending


def test_a_seq_too_far_ahead_is_refused_and_changes_nothing() -> None:
    order: ChunkOrder[int] = ChunkOrder(max_pending=2)
    assert order.offer(1, 1)[0] == "buffered" and order.offer(2, 2)[0] == "buffered"
    assert order.offer(3, 3) == ("too_far", [])  # more than max_pending ahead of 0
    assert order.offer(10**9, 0) == ("too_far", [])
    assert order.pending.keys() == {1, 2} and order.next_seq == 0
    assert order.offer(0, 0) == ("ready", [0, 1, 2])
    assert order.offer(5, 5)[0] == "buffered"  # the bound moves with the next expected seq


def test_waiting_chunks_within_the_bound_never_overflow() -> None:
    order: ChunkOrder[int] = ChunkOrder(max_pending=3)
    for seq in range(1, 100):
        status, _ = order.offer(seq, seq)
        assert status in ("buffered", "too_far")
    assert len(order.pending) == 3


def test_closed_set_keeps_why() -> None:
    closed = ClosedSet(4)
    closed.add("a", "limit")
    assert closed.reason("a") == "limit" and closed.reason("b") is None


def test_closed_set_forgets_the_oldest() -> None:
    closed = ClosedSet(2)
    for key in ("a", "b", "c"):
        closed.add(key)
    assert "a" not in closed and "b" in closed and "c" in closed
