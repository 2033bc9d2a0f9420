"""Blocking model calls off the event loop, where a call that times out cannot block the next one.

A torch call cannot be interrupted from outside its thread. A plain single-thread executor therefore keeps a
timed-out call running, and every later call (the halves of a split batch included) queues behind it and times out
in turn. Here the calls run on a *lane*, one daemon thread: a call past its timeout abandons its lane (the thread
ends when the call returns; its result is dropped) and the next call starts on a fresh one. Abandoned calls that
are still running are bounded (``max_abandoned``): past that, calls are refused (``LanesExhausted``, a kind of
``ExpertUnavailable``: retried later) and ``stuck()`` says so, which turns liveness red: a call that never
returns (a wedged device) is freed only by restarting the process, which the orchestrator then does. Daemon
threads, so a wedged call never holds up the process's exit either.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from probes.errors import ExpertUnavailable

T = TypeVar("T")
_Job = tuple[Callable[..., Any], tuple[Any, ...], "concurrent.futures.Future[Any]"] | None


class LanesExhausted(ExpertUnavailable):
    """Too many timed-out calls are still running: no new call is started until one returns."""


class _Lane(threading.Thread):
    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            fn, args, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                future.set_exception(exc)


class Lanes:
    """One lane at a time runs calls in order; ``call`` abandons it on a timeout."""

    def __init__(self, name: str, *, max_abandoned: int) -> None:
        self.name = name
        self.max_abandoned = max_abandoned
        self._ids = itertools.count()
        self._lane = self._new_lane()
        self._abandoned: list[_Lane] = []
        self.abandoned_total = 0

    def _new_lane(self) -> _Lane:
        lane = _Lane(f"{self.name}-{next(self._ids)}")
        lane.start()
        return lane

    def abandoned_running(self) -> int:
        """Abandoned calls still running (their threads end when they return)."""
        self._abandoned = [lane for lane in self._abandoned if lane.is_alive()]
        return len(self._abandoned)

    def stuck(self) -> str | None:
        running = self.abandoned_running()
        if running < self.max_abandoned:
            return None
        return f"{running} {self.name} calls still running past their timeout (limit {self.max_abandoned})"

    async def call(self, timeout: float, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the lane; TimeoutError after ``timeout`` s, and the next call starts on a new lane."""
        why = self.stuck()
        if why is not None:
            raise LanesExhausted(why)
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        lane = self._lane
        lane.jobs.put((fn, args, future))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=timeout)
        except TimeoutError:
            if lane is self._lane:
                self._abandon()
            raise

    def _abandon(self) -> None:
        old = self._lane
        old.jobs.put(None)  # ends once the stuck call returns
        self._abandoned.append(old)
        self.abandoned_total += 1
        self._lane = self._new_lane()

    def close(self) -> None:
        self._lane.jobs.put(None)
