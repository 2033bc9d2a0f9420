"""Online recalibration of the probe from audited events: the guard teaches the probe (issue 12, point 5).

Under a shift of traffic no offline cut holds (docs/generalization.md: a cut certified at 5 % benign flag rate
realises 10–39 % on held-out sources). A small audit sample, chosen by a hash of the event id and independent
of the delegation decision, is sent to the expert; its verdicts are unbiased labels of *current* traffic.
``OnlineRecalibrator`` keeps a window of (probe score, expert verdict) pairs and, every ``refit_every`` audits
once ``min_window`` are held,

* refits a Platt map q = σ(a·logit(p) + b) (Newton on a 2-parameter logistic loss, L2-pulled towards the
  identity a=1, b=0 so a one-class or tiny window stays finite and close to the bundle's scores), and
* re-certifies the unsafe cut on the window's expert-benign items with the bundle's own LTT test
  (``calibrate_unsafe_cut``, same ε and δ): with probability ≥ 1 − δ the expert-benign flag rate ≤ ε for
  traffic exchangeable with the window.

What the guarantee is about: the *expert's* benign verdicts, not ground truth; it is as good as the expert.
Runtime module: numpy and pydantic only (no sklearn/scipy), so the worker can import it.
"""

from __future__ import annotations

import hashlib
from collections import deque
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import numpy.typing as npt

from probes.calibration import calibrate_unsafe_cut
from probes.config import AuditConfig, Frozen

__all__ = ["OnlineRecalibrator", "PlattMap", "RecalibrationState", "audit_selected", "fit_platt"]

F64 = npt.NDArray[np.float64]
_EPS = 1e-7
#: The slope of the map is kept positive so the map stays monotone: a cut on q is a cut on p.
_MIN_SLOPE = 1e-3


def audit_selected(event_id: str, rate: float, salt: str = "audit") -> bool:
    """Whether an event is audited: a hash of its id below ``rate``.

    Deterministic, so a re-delivered event is audited exactly when its first delivery was; independent of the
    probe score and of delegation, so the audited events are an unbiased sample of the traffic.
    """
    if not 0 <= rate <= 1:
        raise ValueError("rate must be in [0, 1]")
    digest = hashlib.sha256(f"{salt}\x00{event_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < rate


def _logit(p: npt.ArrayLike) -> F64:
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.asarray(np.log(q) - np.log1p(-q), dtype=np.float64)


def _sigmoid(z: F64) -> F64:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)), dtype=np.float64)


class PlattMap(Frozen):
    """q = σ(a·logit(p) + b); the identity is a=1, b=0."""

    a: float = 1.0
    b: float = 0.0

    def __call__(self, p: npt.ArrayLike) -> F64:
        return _sigmoid(self.a * _logit(p) + self.b)

    def inverse(self, q: float) -> float:
        """The probe score p with map(p) = q (a > 0: the map is increasing)."""
        return float(_sigmoid(np.asarray([(float(_logit([q])[0]) - self.b) / self.a]))[0])


IDENTITY = PlattMap()


def fit_platt(p: npt.ArrayLike, labels: npt.ArrayLike, *, l2: float = 1.0, prior: PlattMap | None = None,
              max_iter: int = 100, tol: float = 1e-10) -> PlattMap:
    """Minimise Σ logloss(y, σ(a·logit(p) + b)) + l2/2·((a − a₀)² + (b − b₀)²) by damped Newton steps.

    The penalty keeps the Hessian positive definite, so a window with one class (or separable scores) has a
    finite optimum near the prior instead of a slope running off to infinity.
    """
    z = _logit(p)
    y = np.asarray(labels, dtype=np.float64)
    if z.shape != y.shape:
        raise ValueError(f"{z.size} scores but {y.size} labels")
    if l2 <= 0:
        raise ValueError("l2 must be positive")
    x = np.stack([z, np.ones_like(z)], axis=1)
    start = prior or IDENTITY
    theta0 = np.asarray([start.a, start.b])
    theta = theta0.copy()

    def loss(t: F64) -> float:
        m = x @ t
        # log(1 + e^m) − y·m, stably
        return float(np.sum(np.logaddexp(0.0, m) - y * m) + 0.5 * l2 * np.sum((t - theta0) ** 2))

    current = loss(theta)
    for _ in range(max_iter):
        q = _sigmoid(x @ theta)
        grad = x.T @ (q - y) + l2 * (theta - theta0)
        hess = (x * (q * (1 - q))[:, None]).T @ x + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-8:  # halve until the loss does not rise: Newton can overshoot on flat tails
            candidate = theta - scale * step
            value = loss(candidate)
            if value <= current + 1e-12:
                break
            scale *= 0.5
        theta, improvement = candidate, current - value
        current = value
        if improvement < tol * max(1.0, abs(current)) and float(np.max(np.abs(scale * step))) < 1e-8 + tol:
            break
    return PlattMap(a=max(float(theta[0]), _MIN_SLOPE), b=float(theta[1]))


class RecalibrationState(Frozen):
    """What a verdict carries about the cut that decided it.

    ``source="offline"``: the bundle's cut applies (too few audits yet, or the window certified no cut).
    ``cut`` is on the calibrated score q = platt(p); ``probe_cut`` is the same decision on the raw probe score
    (flag ⇔ p ≥ probe_cut), which is what a consumer without the map needs.
    """

    version: int  # bumps on every refit
    source: Literal["offline", "window"]
    cut: float
    probe_cut: float
    valid: bool  # the cut in force is certified (the bundle's own validity while offline)
    n: int  # audited items in the window
    n_benign: int  # of which the expert called benign: what the cut was certified on
    fitted_at: datetime | None
    platt_a: float
    platt_b: float
    epsilon: float
    delta: float


class OnlineRecalibrator:
    """A window of audited (probe score, expert verdict) pairs and the map + cut refitted on it.

    Not thread-safe: one owner (the monitor's consumer task) feeds it and reads it.
    """

    def __init__(self, config: AuditConfig, *, offline_cut: float, offline_valid: bool = True) -> None:
        self.config = config
        self._offline_cut = float(offline_cut)
        self._offline_valid = offline_valid
        self._scores: deque[float] = deque(maxlen=config.window)
        self._verdicts: deque[bool] = deque(maxlen=config.window)
        self._since_refit = 0
        self._map = PlattMap()
        self._state = self._offline_state(version=0, n=0, n_benign=0, fitted_at=None)

    def _offline_state(self, *, version: int, n: int, n_benign: int, fitted_at: datetime | None,
                       platt: PlattMap | None = None) -> RecalibrationState:
        m = platt or PlattMap()
        return RecalibrationState(
            version=version, source="offline", cut=float(m([self._offline_cut])[0]), probe_cut=self._offline_cut,
            valid=self._offline_valid, n=n, n_benign=n_benign, fitted_at=fitted_at, platt_a=m.a, platt_b=m.b,
            epsilon=self.config.epsilon, delta=self.config.delta)

    @property
    def state(self) -> RecalibrationState:
        return self._state

    @property
    def platt(self) -> PlattMap:
        return self._map

    def calibrated(self, p: npt.ArrayLike) -> F64:
        """The probe's scores through the current map (the identity until the first refit)."""
        return self._map(p)

    def flags(self, p: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """The unsafe verdicts of raw probe scores under the cut in force."""
        return np.asarray(p, dtype=np.float64) >= self._state.probe_cut

    @property
    def window_size(self) -> int:
        return len(self._scores)

    def window_benign_flag_rate(self) -> float | None:
        """Share of the window's expert-benign items the cut in force flags (what the cut certifies ≤ ε)."""
        benign = [p for p, unsafe in zip(self._scores, self._verdicts, strict=True) if not unsafe]
        if not benign:
            return None
        return float(np.mean(np.asarray(benign) >= self._state.probe_cut))

    def add(self, p: float, expert_unsafe: bool) -> None:
        """Add one audited item to the window without refitting (the caller decides when to refit)."""
        self._scores.append(float(p))
        self._verdicts.append(bool(expert_unsafe))
        self._since_refit += 1

    def observe(self, p: float, expert_unsafe: bool) -> RecalibrationState | None:
        """Add one audited item; returns the new state when this audit triggered a refit."""
        self.add(p, expert_unsafe)
        if len(self._scores) < self.config.min_window:
            return None
        if self._state.fitted_at is not None and self._since_refit < self.config.refit_every:
            return None
        return self.refit()

    def refit(self, now: datetime | None = None, *, version: int | None = None) -> RecalibrationState:
        """Refit the map and re-certify the cut on the window as it is.

        ``version``: the new state's version (default: one more than the current); the worker passes one derived
        from the audit stream itself, so every replica fed the same audits carries the same version.
        """
        self._since_refit = 0
        p = np.fromiter(self._scores, dtype=np.float64, count=len(self._scores))
        b = np.fromiter(self._verdicts, dtype=np.int64, count=len(self._verdicts))
        when = now or datetime.now(UTC)
        self._map = fit_platt(p, b, l2=self.config.platt_l2)
        # The map is increasing, so certifying on raw p flags exactly the items certifying on q would;
        # certifying on p avoids ties the map's rounding could merge.
        result = calibrate_unsafe_cut(p, b, epsilon=self.config.epsilon, delta=self.config.delta, scorer="probe")
        version = self._state.version + 1 if version is None else version
        if not result.valid:
            self._state = self._offline_state(version=version, n=int(p.size), n_benign=result.n, fitted_at=when,
                                              platt=self._map)
        else:
            self._state = RecalibrationState(
                version=version, source="window", cut=float(self._map([result.cut])[0]), probe_cut=result.cut,
                valid=True, n=int(p.size), n_benign=result.n, fitted_at=when, platt_a=self._map.a,
                platt_b=self._map.b, epsilon=self.config.epsilon, delta=self.config.delta)
        return self._state
