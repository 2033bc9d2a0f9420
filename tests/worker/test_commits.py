from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.commits import CommitTracker


def test_only_contiguous_prefix_is_committable() -> None:
    t: CommitTracker[str] = CommitTracker()
    for o in (10, 11, 12, 13):
        t.track("p0", o)
    assert t.committable() == {"p0": 10}
    t.done("p0", 12)
    assert t.position("p0") == 10
    t.done("p0", 10)
    assert t.position("p0") == 11
    t.done("p0", 11)
    assert t.position("p0") == 13
    t.mark_committed({"p0": 13})
    assert t.committable() == {}
    t.done("p0", 13)
    assert t.committable() == {"p0": 14} and t.in_flight() == 0


def test_partitions_are_independent_and_forget() -> None:
    t: CommitTracker[int] = CommitTracker()
    t.track(0, 5)
    t.track(1, 100)
    t.done(1, 100)
    assert t.committable() == {0: 5, 1: 101}
    t.forget({0})
    t.done(0, 5)  # late completion of a revoked partition is ignored
    assert t.committable() == {1: 101}


def test_a_reseek_restarts_the_partition() -> None:
    t: CommitTracker[int] = CommitTracker()
    assert t.track(0, 5) and t.track(0, 6)
    t.done(0, 5)
    assert not t.track(0, 3)  # the consumer went back to the committed offset
    assert t.position(0) == 3 and t.in_flight(0) == 1


@given(st.integers(0, 1000), st.permutations(list(range(30))), st.integers(0, 30))
def test_position_never_passes_an_unfinished_offset(start: int, order: list[int], finished: int) -> None:
    t: CommitTracker[str] = CommitTracker()
    for i in range(30):
        t.track("p", start + i)
    done = set(order[:finished])
    for i in order[:finished]:
        t.done("p", start + i)
    position = t.position("p")
    assert position is not None
    expected = start + next((i for i in range(30) if i not in done), 30)
    assert position == expected
    assert all(i in done for i in range(position - start))
