"""Online recalibration of the probe from audited events: the guard teaches the probe (issue 12, point 5).

Under a shift of traffic no offline cut holds (docs/generalization.md: a cut certified at 5 % benign flag rate
realises 10–39 % on held-out sources). A small audit sample, chosen by a hash of the event id and independent
of the delegation decision, is sent to the expert; its verdicts are unbiased labels of *current* traffic.
``OnlineRecalibrator`` keeps a window of (probe score, expert verdict) pairs and, every ``refit_every`` audits
once ``min_window`` are held,

* ``refit="platt"``: refits a Platt map q = σ(a·logit(p) + b) (Newton on a 2-parameter logistic loss, L2-pulled
  towards the identity a=1, b=0 so a one-class or tiny window stays finite and close to the bundle's scores);
  it moves the operating point along the probe's ROC curve, it cannot reorder the traffic;
* ``refit="head"``: refits the probe's linear head itself on the window's pooled activations (the same
  logistic loss, L2-pulled towards the bundle's head, so a small window adjusts the bundle's direction rather
  than replacing it). This is what lets a guard that is right on new traffic teach the probe to rank it
  (docs/generalization.md: held-out AUROC 0.44–0.66 → 0.79–0.96 from ~100 correct audits);
* and re-certifies the unsafe cut on the window's expert-benign items with the bundle's own LTT test
  (``calibrate_unsafe_cut``, same ε and δ): with probability ≥ 1 − δ the expert-benign flag rate ≤ ε for
  traffic exchangeable with the window. A refit head is certified on its out-of-fold scores (each window item
  scored by the head refit without its fold), since its in-window scores are fitted to those very items.

What the guarantee is about: the *expert's* benign verdicts, not ground truth; it is as good as the expert.
Runtime module: numpy and pydantic only (no sklearn/scipy), so the worker can import it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import numpy.typing as npt

from probes.calibration.ltt import calibrate_unsafe_cut
from probes.config import AuditConfig, Frozen
from probes.heads.inference import LinearHead

__all__ = ["OnlineRecalibrator", "PlattMap", "RecalibrationState", "Refit", "WindowSnapshot", "audit_selected",
           "fit_anchored_logistic", "fit_platt", "out_of_fold_scores", "refit_head"]

F64 = npt.NDArray[np.float64]
_EPS = 1e-7
#: The slope of the map is kept positive so the map stays monotone: a cut on q is a cut on p.
_MIN_SLOPE = 1e-3
#: Folds of the out-of-fold scores a refit head's cut is certified on.
HEAD_FOLDS = 5


def audit_selected(event_id: str, rate: float, salt: str = "audit", *, key: bytes | None = None) -> bool:
    """Whether an event is audited: a hash of its id below ``rate``.

    Deterministic, so a re-delivered event is audited exactly when its first delivery was; independent of the
    probe score and of delegation, so the audited events are an unbiased sample of the traffic. ``key``: a secret
    (the worker's ``audit.secret``) makes it an HMAC, so whoever chooses event ids can neither tell nor choose
    which are audited; without one (offline benchmarks) anyone can compute it.
    """
    if not 0 <= rate <= 1:
        raise ValueError("rate must be in [0, 1]")
    message = f"{salt}\x00{event_id}".encode()
    digest = hmac.new(key, message, hashlib.sha256).digest() if key is not None else hashlib.sha256(message).digest()
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


def fit_anchored_logistic(x: npt.ArrayLike, labels: npt.ArrayLike, prior: npt.ArrayLike, *, l2: float,
                          max_iter: int = 100, tol: float = 1e-10) -> F64:
    """argmin_θ Σ logloss(y, σ(x·θ)) + l2/2·‖θ − prior‖² by damped Newton steps (x holds an intercept column).

    The pull keeps the Hessian positive definite, so a window with one class (or separable items) has a finite
    optimum near the prior instead of weights running off to infinity.
    """
    xs = np.asarray(x, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    theta0 = np.asarray(prior, dtype=np.float64)
    if xs.ndim != 2 or xs.shape[0] != y.size or xs.shape[1] != theta0.size:
        raise ValueError(f"x {xs.shape}, {y.size} labels and a prior of {theta0.size} do not fit together")
    if l2 <= 0:
        raise ValueError("l2 must be positive")
    theta = theta0.copy()

    def loss(t: F64) -> float:
        m = xs @ t
        # log(1 + e^m) − y·m, stably
        return float(np.sum(np.logaddexp(0.0, m) - y * m) + 0.5 * l2 * np.sum((t - theta0) ** 2))

    current = loss(theta)
    for _ in range(max_iter):
        q = _sigmoid(xs @ theta)
        grad = xs.T @ (q - y) + l2 * (theta - theta0)
        hess = (xs * (q * (1 - q))[:, None]).T @ xs + l2 * np.eye(theta.size)
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
    return np.asarray(theta, dtype=np.float64)


def fit_platt(p: npt.ArrayLike, labels: npt.ArrayLike, *, l2: float = 1.0, prior: PlattMap | None = None,
              max_iter: int = 100, tol: float = 1e-10) -> PlattMap:
    """The Platt map of a window: ``fit_anchored_logistic`` on (logit p, 1), pulled towards ``prior``."""
    z = _logit(p)
    if z.shape != np.shape(labels):
        raise ValueError(f"{z.size} scores but {np.size(labels)} labels")
    start = prior or IDENTITY
    theta = fit_anchored_logistic(np.stack([z, np.ones_like(z)], axis=1), labels, [start.a, start.b], l2=l2,
                                  max_iter=max_iter, tol=tol)
    return PlattMap(a=max(float(theta[0]), _MIN_SLOPE), b=float(theta[1]))


def _design(head: LinearHead, features: npt.ArrayLike) -> F64:
    z = (np.asarray(features, dtype=np.float64) - head.mean) / head.scale
    return np.hstack([z, np.ones((z.shape[0], 1))])


def refit_head(head: LinearHead, features: npt.ArrayLike, labels: npt.ArrayLike, *, l2: float) -> LinearHead:
    """The probe head refit on labelled pooled activations, pulled towards ``head`` (same standardisation)."""
    theta = fit_anchored_logistic(_design(head, features), labels, np.append(head.weight, head.bias), l2=l2)
    return LinearHead(mean=head.mean, scale=head.scale, weight=theta[:-1].astype(np.float32), bias=float(theta[-1]))


def out_of_fold_scores(head: LinearHead, features: npt.ArrayLike, labels: npt.ArrayLike, *, l2: float,
                       folds: int = HEAD_FOLDS) -> F64:
    """Each item scored by the head refit on the other folds (item i is in fold i mod ``folds``)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    fold = np.arange(len(y)) % folds
    out = np.empty(len(y), dtype=np.float64)
    for k in range(min(folds, len(y))):
        held = fold == k
        out[held] = refit_head(head, x[~held], y[~held], l2=l2).proba(x[held]) if np.any(~held) else head.proba(
            x[held])
    return out


class RecalibrationState(Frozen):
    """What a verdict carries about the cut that decided it.

    ``source="offline"``: the bundle's head and cut apply (too few audits yet, or the window certified no cut).
    ``refit="platt"``: ``cut`` is on the calibrated score q = platt(p) and ``probe_cut`` is the same decision on
    the raw probe score (flag ⇔ p ≥ probe_cut), which is what a consumer without the map needs.
    ``refit="head"`` with ``source="window"``: the decision is the refit head's score ≥ ``cut``; no cut on the
    bundle's raw score makes the same decisions, so ``probe_cut`` is None.
    """

    version: int  # bumps on every refit
    source: Literal["offline", "window"]
    refit: Literal["platt", "head"] = "platt"
    cut: float
    probe_cut: float | None
    valid: bool  # the cut in force is certified (the bundle's own validity while offline)
    n: int  # audited items in the window
    n_benign: int  # of which the expert called benign: what the cut was certified on
    fitted_at: datetime | None
    platt_a: float
    platt_b: float
    epsilon: float
    delta: float

    @property
    def head_decides(self) -> bool:
        """The refit head's score decides (a window head cut), not a cut on the raw probe score."""
        return self.refit == "head" and self.source == "window"


@dataclass(frozen=True, slots=True)
class WindowSnapshot:
    """A copy of the window at a refit point: what ``OnlineRecalibrator.compute_refit`` reads, so a refit can run
    in another thread while the owner goes on adding audits."""

    scores: F64
    verdicts: npt.NDArray[np.int64]
    features: npt.NDArray[np.float32] | None  # (n, width) under refit="head", else None
    added: int  # audits ever added when it was taken


@dataclass(frozen=True, slots=True)
class Refit:
    """One refit's outcome, not yet in force: ``OnlineRecalibrator.apply`` puts it in force in one step."""

    state: RecalibrationState
    platt: PlattMap
    head: LinearHead | None
    added: int


class OnlineRecalibrator:
    """A window of audited (probe score, expert verdict[, pooled activations]) and the map or head + cut refit on it.

    ``head``: the bundle's probe head, required with ``config.refit == "head"`` (the window then keeps each
    audited item's pooled activations, and scoring needs them). Not thread-safe: one owner feeds it and reads it;
    only ``compute_refit`` (pure: a snapshot in, a ``Refit`` out) may run in another thread, the owner then puts
    the result in force with ``apply``.
    """

    def __init__(self, config: AuditConfig, *, offline_cut: float, offline_valid: bool = True,
                 head: LinearHead | None = None, group_cap: int | None = None) -> None:
        if config.refit == "head" and head is None:
            raise ValueError("audit.refit=head needs the bundle's probe head")
        self.config = config
        self._offline_cut = float(offline_cut)
        self._offline_valid = offline_valid
        self._offline_head = head
        self._head = head
        self._scores: deque[float] = deque(maxlen=config.window)
        self._verdicts: deque[bool] = deque(maxlen=config.window)
        self._features: deque[npt.NDArray[np.float32]] = deque(maxlen=config.window)
        # The group (tenant) of each item, and how many each holds: at most ``group_cap`` per group.
        self._groups: deque[str] = deque()
        self._group_counts: Counter[str] = Counter()
        self.group_cap = config.window if group_cap is None else max(1, min(group_cap, config.window))
        self._since_refit = 0
        self._added = 0
        self._map = PlattMap()
        self._state = self._offline_state(version=0, n=0, n_benign=0, fitted_at=None)

    def _offline_state(self, *, version: int, n: int, n_benign: int, fitted_at: datetime | None,
                       platt: PlattMap | None = None) -> RecalibrationState:
        m = platt or PlattMap()
        return RecalibrationState(
            version=version, source="offline", refit=self.config.refit, cut=float(m([self._offline_cut])[0]),
            probe_cut=self._offline_cut, valid=self._offline_valid, n=n, n_benign=n_benign, fitted_at=fitted_at,
            platt_a=m.a, platt_b=m.b, epsilon=self.config.epsilon, delta=self.config.delta)

    @property
    def state(self) -> RecalibrationState:
        return self._state

    @property
    def platt(self) -> PlattMap:
        return self._map

    @property
    def head(self) -> LinearHead | None:
        """The head in force: the refit one under a window head cut, else the bundle's (None in Platt mode)."""
        return self._head

    def head_cut(self) -> tuple[LinearHead, float] | None:
        """The refit head and its cut while they decide (a window head cut), else None.

        Read from another thread, the two may be one refit apart (``apply`` sets them one after the other): good
        for choosing which events to score again, not for deciding them."""
        state, head = self._state, self._head
        if not state.head_decides or head is None:
            return None
        return head, state.cut

    def calibrated(self, p: npt.ArrayLike, features: npt.ArrayLike | None = None) -> F64:
        """The scores the cut in force applies to: the refit head's on ``features`` under a window head cut, else
        the probe's scores through the current map (the identity until the first Platt refit)."""
        if self._state.head_decides:
            if features is None or self._head is None:
                raise ValueError("a refit head scores pooled activations: pass features")
            return self._head.proba(features)
        return self._map(p)

    def flags(self, p: npt.ArrayLike, features: npt.ArrayLike | None = None) -> npt.NDArray[np.bool_]:
        """The unsafe verdicts under the cut in force (``features``: the pooled activations behind ``p``)."""
        if self._state.head_decides:
            return np.asarray(self.calibrated(p, features) >= self._state.cut, dtype=np.bool_)
        assert self._state.probe_cut is not None
        return np.asarray(p, dtype=np.float64) >= self._state.probe_cut

    @property
    def features_width(self) -> int | None:
        """The width of the pooled activations an audited item needs (refit="head"), else None."""
        if self.config.refit != "head" or self._offline_head is None:
            return None
        return int(self._offline_head.weight.size)

    @property
    def window_size(self) -> int:
        return len(self._scores)

    def window_benign_flag_rate(self) -> float | None:
        """Share of the window's expert-benign items the cut in force flags (what the cut certifies ≤ ε)."""
        benign = [i for i, unsafe in enumerate(self._verdicts) if not unsafe]
        if not benign:
            return None
        p = np.asarray(self._scores, dtype=np.float64)[benign]
        feats = np.stack([self._features[i] for i in benign]) if self._state.head_decides else None
        return float(np.mean(self.flags(p, feats)))

    def group_count(self, group: str) -> int:
        """Items of ``group`` in the window."""
        return self._group_counts[group]

    def add(self, p: float, expert_unsafe: bool, features: npt.ArrayLike | None = None, *,
            group: str = "") -> bool:
        """Add one audited item to the window without refitting (the caller decides when to refit).

        A ``group`` already holding ``group_cap`` items gives up its oldest for this one (returns True): one group
        (a tenant) never holds more than its share of the window, whatever it sends.
        """
        row = None
        if self.config.refit == "head":
            if features is None:
                raise ValueError("audit.refit=head: an audited item needs its pooled activations")
            row = np.asarray(features, dtype=np.float32).reshape(-1)
            assert self._offline_head is not None
            if row.shape != self._offline_head.weight.shape:
                raise ValueError(f"features of width {row.size}, the head reads {self._offline_head.weight.size}")
        displaced = self._group_counts[group] >= self.group_cap
        if displaced:
            oldest = self._groups.index(group)
            del self._scores[oldest], self._verdicts[oldest], self._groups[oldest]
            if row is not None:
                del self._features[oldest]
            self._group_counts[group] -= 1
        elif len(self._groups) == self.config.window:
            self._group_counts[self._groups.popleft()] -= 1  # the deques with maxlen drop their oldest themselves
        if row is not None:
            self._features.append(row)
        self._groups.append(group)
        self._group_counts[group] += 1
        self._scores.append(float(p))
        self._verdicts.append(bool(expert_unsafe))
        self._since_refit += 1
        self._added += 1
        return displaced

    def observe(self, p: float, expert_unsafe: bool, features: npt.ArrayLike | None = None) -> RecalibrationState | None:
        """Add one audited item; returns the new state when this audit triggered a refit."""
        self.add(p, expert_unsafe, features)
        if len(self._scores) < self.config.min_window:
            return None
        if self._state.fitted_at is not None and self._since_refit < self.config.refit_every:
            return None
        return self.refit()

    def refit(self, now: datetime | None = None, *, version: int | None = None) -> RecalibrationState:
        """Refit the map (or the head) and re-certify the cut on the window as it is, in force at once.

        ``version``: the new state's version (default: one more than the current); the worker passes one derived
        from the audit stream itself, so every replica fed the same audits carries the same version.
        ``snapshot`` → ``compute_refit`` (anywhere) → ``apply`` is the same in three steps.
        """
        return self.apply(self.compute_refit(self.snapshot(), now or datetime.now(UTC),
                                             self._state.version + 1 if version is None else version))

    def snapshot(self) -> WindowSnapshot:
        """A copy of the window for ``compute_refit`` (cheap: a window of 1000 × 576 float32 is 2.3 MB)."""
        n = len(self._scores)
        return WindowSnapshot(
            scores=np.fromiter(self._scores, dtype=np.float64, count=n),
            verdicts=np.fromiter(self._verdicts, dtype=np.int64, count=n),
            features=np.stack(list(self._features)) if self.config.refit == "head" and n else None,
            added=self._added)

    def compute_refit(self, window: WindowSnapshot, when: datetime, version: int) -> Refit:
        """The refit of a window snapshot, not yet in force. It reads only the configuration and the bundle's head
        and cut, never the state in force, so it may run in another thread while the owner reads and feeds this
        recalibrator, and the same snapshot and version give the same result wherever it runs."""
        p, b = window.scores, window.verdicts
        if self.config.refit == "head":
            return self._compute_head(window, when, version)
        platt = fit_platt(p, b, l2=self.config.platt_l2)
        # The map is increasing, so certifying on raw p flags exactly the items certifying on q would;
        # certifying on p avoids ties the map's rounding could merge.
        result = calibrate_unsafe_cut(p, b, epsilon=self.config.epsilon, delta=self.config.delta, scorer="probe")
        if not result.valid:
            state = self._offline_state(version=version, n=int(p.size), n_benign=result.n, fitted_at=when,
                                        platt=platt)
        else:
            state = RecalibrationState(
                version=version, source="window", cut=float(platt([result.cut])[0]), probe_cut=result.cut,
                valid=True, n=int(p.size), n_benign=result.n, fitted_at=when, platt_a=platt.a,
                platt_b=platt.b, epsilon=self.config.epsilon, delta=self.config.delta)
        return Refit(state=state, platt=platt, head=self._offline_head, added=window.added)

    def _compute_head(self, window: WindowSnapshot, when: datetime, version: int) -> Refit:
        assert self._offline_head is not None
        p, b, x = window.scores, window.verdicts, window.features
        if x is None:
            raise ValueError("audit.refit=head: the window holds no pooled activations")
        l2 = self.config.head_l2
        oof = out_of_fold_scores(self._offline_head, x, b, l2=l2)
        result = calibrate_unsafe_cut(oof, b, epsilon=self.config.epsilon, delta=self.config.delta, scorer="probe")
        if not result.valid:
            # No certificate: the bundle's head and cut stay in force, as a Platt window without one does.
            state = self._offline_state(version=version, n=int(p.size), n_benign=result.n, fitted_at=when)
            return Refit(state=state, platt=PlattMap(), head=self._offline_head, added=window.added)
        state = RecalibrationState(
            version=version, source="window", refit="head", cut=result.cut, probe_cut=None, valid=True,
            n=int(p.size), n_benign=result.n, fitted_at=when, platt_a=1.0, platt_b=0.0,
            epsilon=self.config.epsilon, delta=self.config.delta)
        return Refit(state=state, platt=PlattMap(), head=refit_head(self._offline_head, x, b, l2=l2),
                     added=window.added)

    def apply(self, refit: Refit) -> RecalibrationState:
        """Put a computed refit in force in one step (on the owner's thread: a reader never sees half of it)."""
        if refit.state.version <= self._state.version:
            raise ValueError(f"refit version {refit.state.version} is not after the one in force "
                             f"({self._state.version})")
        self._map, self._head, self._state = refit.platt, refit.head, refit.state
        self._since_refit = self._added - refit.added  # audits added while it was computed still count
        return self._state
