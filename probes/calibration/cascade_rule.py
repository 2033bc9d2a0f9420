"""The cascade as arithmetic (docs/method.md §5): its final score, its decision under the two unsafe cuts, and cost
per 1k events. Every caller (calibration, evaluation, benchmarks, demo) uses these, so the figures agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from probes.runtime.manifest import DEFAULT_UNSAFE_CUT

F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Cuts:
    """The unsafe cuts in force: the probe's on p, the expert's on b (each "unsafe" at or above its cut)."""

    probe: float = DEFAULT_UNSAFE_CUT
    expert: float = DEFAULT_UNSAFE_CUT


#: Both cuts at the default: uncalibrated decisions.
DEFAULT_CUTS = Cuts()


def cascade_scores(delegated: npt.ArrayLike, p: npt.ArrayLike, b: npt.ArrayLike) -> F64:
    """s(x) = b(x) if delegated else p(x)."""
    return np.where(np.asarray(delegated, dtype=bool), np.asarray(b, dtype=np.float64),
                    np.asarray(p, dtype=np.float64))


def cascade_decisions(delegated: npt.ArrayLike, p: npt.ArrayLike, b: npt.ArrayLike, cuts: Cuts) -> Bools:
    """"Unsafe" per event: the expert's score at its cut where delegated, else the probe's at its own."""
    flags: Bools = np.where(np.asarray(delegated, dtype=bool), np.asarray(b, dtype=np.float64) >= cuts.expert,
                            np.asarray(p, dtype=np.float64) >= cuts.probe)
    return flags


def per_1k(total: float, events: int) -> float:
    """A total over ``events`` events (seconds, parameters x tokens, expert calls) scaled to 1000 events."""
    if events <= 0:
        raise ValueError("cost per 1k events needs at least one event")
    return 1000.0 * total / events
