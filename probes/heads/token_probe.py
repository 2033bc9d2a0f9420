"""The token-level probe of a streamed response: per-token logits, smoothed by an EMA or rolling means.

Runtime only (no training code): the head is a ``LinearHead`` stored in the bundle under ``token``; its
settings and the calibrated stop thresholds are the manifest's ``stream`` section. Two aggregators:

- ``ema``: s_t = λ·s_{t−1} + (1−λ)·z_t, s_0 = z_0 (docs/method.md §7, ``probes.activations.features.ema_scores``);
- ``rolling_max``: m_t = mean of the last k logits (fewer at the start), the sequence score is max_t m_t.

The manifest's ``stream`` section is typed (``probes.runtime.manifest.StreamManifest``).

A stream stops at the first token whose smoothed score exceeds the aggregator's threshold, i.e. exactly
when the running peak crosses it, so the threshold is calibrated on each benign response's peak.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

import numpy as np
import numpy.typing as npt

from probes.activations.features import ema_scores
from probes.config import Aggregator
from probes.errors import BundleError
from probes.heads.inference import LinearHead, sigmoid
from probes.runtime.bundle import Bundle
from probes.runtime.manifest import StreamManifest

F64 = npt.NDArray[np.float64]
AGGREGATORS: tuple[Aggregator, ...] = get_args(Aggregator)
TOKEN_HEAD = "token"


def stream_section(bundle: Bundle) -> StreamManifest:
    """The typed ``stream`` section of a bundle that has a token head (a clear error otherwise)."""
    section = bundle.manifest.stream
    if TOKEN_HEAD not in bundle.heads or section is None:
        raise BundleError("the bundle has no token-level probe: run `ctd-monitor train-token-probe` first")
    return section


def rolling_means(token_logits: npt.ArrayLike, window: int) -> F64:
    """m_t = mean(z[max(0, t−k+1) .. t]): the mean of the last ``window`` logits, fewer before the k-th token."""
    z = np.asarray(token_logits, dtype=np.float64)
    if z.size == 0:
        return z.copy()
    sums = np.cumsum(z)
    out = sums.copy()
    out[window:] = sums[window:] - sums[:-window]
    counts = np.minimum(np.arange(1, z.size + 1), window)
    return out / counts


def smoothed(token_logits: npt.ArrayLike, aggregator: Aggregator, *, decay: float, window: int) -> F64:
    """The whole smoothed series of one response, offline."""
    if aggregator == "ema":
        return ema_scores(token_logits, decay)
    return rolling_means(token_logits, window)


def first_crossing(series: npt.ArrayLike, threshold: float | None) -> int | None:
    """Index of the first value above the threshold (None: never, or no valid threshold)."""
    if threshold is None:
        return None
    above = np.flatnonzero(np.asarray(series, dtype=np.float64) > threshold)
    return int(above[0]) if above.size else None


@dataclass
class StreamAggregate:
    """The running state of one response: O(window) floats however long it streams.

    ``push`` feeds new token logits and returns their smoothed values for both aggregators; feeding a
    response in any split gives the same values as ``smoothed`` over the whole of it.
    """

    decay: float
    window: int
    count: int = 0
    ema: float = 0.0
    recent: deque[float] = field(default_factory=deque)
    peak: dict[str, float] = field(default_factory=lambda: {a: -np.inf for a in AGGREGATORS})
    last: dict[str, float] = field(default_factory=lambda: {a: -np.inf for a in AGGREGATORS})

    def push(self, token_logits: Sequence[float] | npt.NDArray[Any]) -> dict[str, F64]:
        z = np.asarray(token_logits, dtype=np.float64)
        out: dict[str, F64] = {a: np.empty(z.size, dtype=np.float64) for a in AGGREGATORS}
        for i, value in enumerate(z.tolist()):
            self.ema = value if self.count == 0 else self.decay * self.ema + (1.0 - self.decay) * value
            self.recent.append(value)
            if len(self.recent) > self.window:
                self.recent.popleft()
            self.count += 1
            # The mean is recomputed from the ≤ k held values rather than kept as a running sum, so it
            # never drifts from the offline cumulative-sum result over thousands of tokens.
            out["ema"][i] = self.ema
            out["rolling_max"][i] = float(np.mean(self.recent))
        for a in AGGREGATORS:
            if z.size:
                self.peak[a] = max(self.peak[a], float(out[a].max()))
                self.last[a] = float(out[a][-1])
        return out

    def nbytes(self) -> int:
        """Memory the state holds (the floats it keeps), for the per-response memory figure."""
        return 8 * (2 + len(self.recent) + 2 * len(AGGREGATORS))


@dataclass(frozen=True)
class StreamSettings:
    """What the manifest's ``stream`` section fixes for the runtime (the config only trains)."""

    decay: float
    window: int
    aggregator: Aggregator
    score: str
    max_response_tokens: int
    holdback_tokens: int
    thresholds: dict[str, float | None]
    alpha: float | None
    delta: float | None

    @property
    def threshold(self) -> float | None:
        """The stop threshold of the configured aggregator (None: no certified threshold, never stop)."""
        return self.thresholds.get(self.aggregator)


@dataclass(frozen=True)
class TokenProbe:
    """The bundle's token head folded onto raw activations (2·d FLOPs a token) plus its stream settings."""

    weight: npt.NDArray[np.float32]
    bias: float
    layer: int
    settings: StreamSettings

    @classmethod
    def from_head(cls, head: LinearHead, layer: int, settings: StreamSettings) -> TokenProbe:
        w, c = head.folded()
        return cls(weight=w, bias=c, layer=layer, settings=settings)

    @classmethod
    def from_bundle(cls, bundle: Bundle, aggregator: Aggregator | None = None) -> TokenProbe:
        section = stream_section(bundle)
        settings = StreamSettings(
            decay=section.decay, window=section.window, aggregator=aggregator or section.aggregator,
            score=section.score, max_response_tokens=section.max_response_tokens,
            holdback_tokens=section.holdback_tokens,
            thresholds={a: section.thresholds[a].threshold if a in section.thresholds else None
                        for a in AGGREGATORS},
            alpha=section.alpha, delta=section.delta,
        )
        return cls.from_head(bundle.heads[TOKEN_HEAD], section.layer, settings)

    def logits(self, states: npt.ArrayLike) -> F64:
        """z_t = wᵀh_t + c for each token state [T, D]."""
        return (np.asarray(states, dtype=np.float32) @ self.weight).astype(np.float64) + self.bias

    def new_aggregate(self) -> StreamAggregate:
        return StreamAggregate(decay=self.settings.decay, window=self.settings.window)

    def series(self, token_logits: npt.ArrayLike, aggregator: Aggregator | None = None) -> F64:
        s = self.settings
        return smoothed(token_logits, aggregator or s.aggregator, decay=s.decay, window=s.window)

    def p_unsafe(self, aggregate: StreamAggregate) -> float:
        """The stream's score as a probability: σ of its peak or final smoothed logit (``score`` setting)."""
        a = self.settings.aggregator
        value = aggregate.peak[a] if self.settings.score == "peak" else aggregate.last[a]
        return float(sigmoid(np.asarray([value]))[0]) if np.isfinite(value) else 0.0

