"""A circuit breaker for model calls: after N failures in a row, stop the storm and say so on /healthz/live.

A model that fails for one input fails that input alone (a dead letter, or an ``expert_unavailable`` verdict). A
model that fails for every input (a wedged GPU, a corrupted CUDA context, weights gone bad) would otherwise turn
the whole backlog into dead letters or critical verdicts while liveness stays green. The breaker counts inputs
given up in a row with no successful call between; at ``threshold`` it opens: callers pause for the cooldown
(doubling, capped) instead of trying, liveness turns red (the orchestrator restarts the process, the usual cure),
and after the cooldown the next calls are tried again (half-open: up to ``threshold`` more give-ups before it
opens again, so a run of poison inputs still gets through, ``threshold`` per cooldown). One success closes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_COOLDOWN_S = 600.0


class CircuitBreaker:
    """Consecutive-failure breaker with a doubling cooldown; clock-injectable for unit tests."""

    def __init__(self, threshold: int, cooldown_s: float, *, max_cooldown_s: float = MAX_COOLDOWN_S,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.threshold = threshold
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max(cooldown_s, max_cooldown_s)
        self._clock = clock
        self._on_change = on_change
        self.failures = 0
        self.opened = False
        self.episodes = 0
        self._cooldown_s = cooldown_s
        self._until = 0.0

    def failure(self) -> bool:
        """One input given up; True when this opened (or re-opened) the breaker."""
        self.failures += 1
        if self.failures < self.threshold:
            return False
        self.failures = 0  # the next window of trials after the cooldown
        self._until = self._clock() + self._cooldown_s
        self._cooldown_s = min(self._cooldown_s * 2, self.max_cooldown_s)
        if not self.opened:
            self.episodes += 1
            self._set(True)
        return True

    def success(self) -> None:
        """A call succeeded: the model works, close."""
        self.failures = 0
        self._cooldown_s = self.base_cooldown_s
        self._until = 0.0
        if self.opened:
            self._set(False)

    def pause_s(self) -> float:
        """How long a caller must wait before trying (0 when closed or when the cooldown is over)."""
        return max(0.0, self._until - self._clock()) if self.opened else 0.0

    def why(self) -> str | None:
        """Why liveness is red (None while closed)."""
        if not self.opened:
            return None
        return f"circuit breaker open: {self.threshold} inputs given up in a row, no call succeeded since"

    def _set(self, opened: bool) -> None:
        self.opened = opened
        if self._on_change is not None:
            self._on_change(opened)
