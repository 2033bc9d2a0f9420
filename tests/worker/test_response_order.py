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


def test_too_many_waiting_chunks_is_an_overflow() -> None:
    order: ChunkOrder[int] = ChunkOrder(max_pending=2)
    assert order.offer(2, 2)[0] == "buffered" and order.offer(3, 3)[0] == "buffered"
    assert order.offer(4, 4) == ("overflow", [])


def test_closed_set_forgets_the_oldest() -> None:
    closed = ClosedSet(2)
    for key in ("a", "b", "c"):
        closed.add(key)
    assert "a" not in closed and "b" in closed and "c" in closed
