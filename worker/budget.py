"""Stage "route": delegate or not under the live delegation budget (window threshold, monitor, hard cap).

Pure and deterministic (no Kafka, no torch, no clock); docs/architecture.md ("Live delegation budget") gives the
method and its guarantees. Scope ``"tenant"`` keeps one window (and one token bucket) per tenant: a tenant that
floods the stream with borderline traffic spends its own budget and tightens its own threshold, never another
tenant's. At most ``max_scopes`` tenants have a window of their own: a new tenant takes the place of the least
recently used one once no event used it for ``scope_idle_events`` decisions (its state is then dropped: a tenant
back after that long starts again from the offline threshold, as a new one does); while every window is in use,
new tenants share one overflow window (worker/tenancy.py, TenantSlots). So the first tenants seen never pin the
table, and rotating names cannot grow it.

The window gauges carry a ``scope`` label: ``worker``, the partition, or the tenant's metric label (TenantLabels:
bounded, the rest and the overflow window under ``other``); several windows under one label report the worst.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import numpy as np
import numpy.typing as npt

from probes.calibration.ltt import delegation_rates, fixed_sequence_test, threshold_grid
from probes.errors import ConfigError
from probes.logs import get_logger
from probes.runtime.manifest import Signal
from probes.runtime.monitor import DelegationRule
from worker.config import BudgetConfig
from worker.events import BudgetState
from worker.metrics import OTHER_TENANTS, WorkerMetrics
from worker.tenancy import TenantSlots

log = get_logger(__name__)

RecertOutcome = Literal["offline", "tightened", "uncertified"]
WORKER_SCOPE = -1  # the key of the single window when scope == "worker"
OVERFLOW_SCOPE = "*"  # tenants beyond budget.max_scopes share this window
ScopeKey = int | str


@dataclass(frozen=True, slots=True)
class Delegation:
    """What the controller decided for one event. It is the single record of that decision: the verdict takes
    ``delegated`` and ``budget`` from it as they are, the review request its threshold and signal value.

    A dataclass, not a pydantic model: the controller builds one per event from values it computed itself, and
    validating them again cost as much as the decision (it never leaves the process; ``budget`` does, validated)."""

    delegated: bool
    signal: Signal
    value: float  # the event's signal value (NaN when the heads produced none)
    budget: BudgetState  # the rule as applied to this event: the verdict's ``budget`` field

    @property
    def reason(self) -> str:
        return f"{self.signal.value}={self.value:.4f} > threshold={self.budget.threshold}"


@dataclass
class ScopeWindow:
    """One scope's window of signals and decisions, its certified threshold, monitor flag and token bucket."""

    key: ScopeKey
    size: int
    signals: collections.deque[float] = field(init=False)
    decisions: collections.deque[bool] = field(init=False)
    delegated: int = 0  # delegations among ``decisions``
    seen: int = 0
    since_recertify: int = 0
    threshold: float | None = None  # τ_w; None until the window has been certified once
    blocked: bool = False  # the last re-certification certified nothing: delegate nothing
    outcome: RecertOutcome | None = None
    exceeded: bool = False
    cap_binding: bool = False  # in a binding episode: from a refusal until the bucket is full again
    tokens: Fraction = Fraction(0)
    cap_hits: int = 0
    recertifications: int = 0
    state: BudgetState | None = None  # the rule as last applied here (shared by events that see the same one)

    def __post_init__(self) -> None:
        self.signals = collections.deque(maxlen=self.size)
        self.decisions = collections.deque(maxlen=self.size)

    @property
    def rate(self) -> float | None:
        return self.delegated / len(self.decisions) if self.decisions else None

    def push(self, signal: float, delegated: bool) -> None:
        if len(self.decisions) == self.size:
            self.delegated -= self.decisions[0]
        if math.isfinite(signal):  # a NaN would poison the window's quantile grid
            self.signals.append(signal)
        self.decisions.append(delegated)
        self.delegated += delegated
        self.seen += 1
        self.since_recertify += 1


class BudgetController:
    """Decides delegation for scored events under the live budget; one instance per worker."""

    def __init__(self, rule: DelegationRule, config: BudgetConfig, metrics: WorkerMetrics | None = None,
                 *, grid_size: int = 200, tenant_label: Callable[[str], str] | None = None) -> None:
        """``tenant_label``: a tenant's bounded metric label (TenantLabels.peek); without it, all are ``other``."""
        self.rule = rule
        self.config = config
        self.metrics = metrics
        self.grid_size = grid_size
        self.windows: dict[ScopeKey, ScopeWindow] = {}
        # Which tenants have a window of their own (scope "tenant"); its clock counts decisions.
        self.tenants = TenantSlots(config.max_scopes, config.scope_idle_events, on_evict=self._evicted)
        self.tenant_label = tenant_label
        self._scope_labels: set[str] = set()  # the gauges' scope label values last set
        self.refill: Fraction | None = None
        self._log_inv_delta = math.log(1 / config.delta)  # the monitor's Hoeffding margin reads it per event
        if config.hard_cap and rule.valid and rule.alpha is not None:
            # repr() is the shortest decimal that round-trips: α = 0.1 becomes exactly 1/10, not a binary float.
            self.refill = Fraction(repr(rule.alpha)) - Fraction(config.cap_burst, config.window)
            if self.refill <= 0:
                raise ConfigError(f"budget.cap_burst={config.cap_burst} must be below alpha × window = "
                                  f"{rule.alpha * config.window:g} for the hard cap to hold the window to alpha")

    @property
    def active(self) -> bool:
        """False without a certified offline threshold and budget: never delegate, nothing to control."""
        return self.rule.valid and self.rule.alpha is not None

    @property
    def evictions(self) -> int:
        return self.tenants.evictions

    def window(self, partition: int, tenant: str | None = None) -> ScopeWindow:
        key: ScopeKey = WORKER_SCOPE
        if self.config.scope == "partition":
            key = partition
        elif self.config.scope == "tenant":
            if tenant is None:
                raise ValueError('budget.scope "tenant" needs each event\'s tenant')
            # A prefix keeps a tenant named "*" apart from the overflow window.
            key = "t:" + tenant if self.tenants.use(tenant) else OVERFLOW_SCOPE
        w = self.windows.get(key)
        if w is None:
            w = self.windows[key] = ScopeWindow(key, self.config.window)
        return w

    def _evicted(self, tenant: str, idle: int) -> None:
        """The tenant's window was idle and its place went to a new tenant: its state goes with it."""
        key = "t:" + tenant
        self.windows.pop(key, None)
        log.info("budget.scope_evicted", scope=key, idle_decisions=idle)

    def scope_label(self, key: ScopeKey) -> str:
        """The gauges' ``scope`` label of a window: bounded like the tenant label of the verdict counters."""
        if isinstance(key, int):
            return "worker" if key == WORKER_SCOPE else str(key)
        if key == OVERFLOW_SCOPE or self.tenant_label is None:
            return OTHER_TENANTS
        return self.tenant_label(key[2:])

    def decide(
        self, signals: npt.ArrayLike, partitions: Sequence[int], tenants: Sequence[str] | None = None
    ) -> list[Delegation]:
        """One decision per event, in order; ``partitions`` (scope "partition") or ``tenants`` (scope "tenant")
        pick each event's window."""
        values = np.asarray(signals, dtype=np.float64)
        if len(partitions) != values.size:
            raise ValueError(f"{values.size} signals but {len(partitions)} partitions")
        if tenants is not None and len(tenants) != values.size:
            raise ValueError(f"{values.size} signals but {len(tenants)} tenants")
        if not self.active:
            state = BudgetState(alpha=self.rule.alpha, threshold=None, offline_threshold=self.rule.threshold,
                                valid=False)
            return [Delegation(delegated=False, signal=self.rule.signal, value=float(v), budget=state) for v in values]
        owners = list(tenants) if tenants is not None else [None] * values.size
        decisions = [self._decide_one(float(s), self.window(p, t))
                     for s, p, t in zip(values, partitions, owners, strict=True)]
        self._update_gauges()
        return decisions

    def applied_threshold(self, w: ScopeWindow) -> float | None:
        """max(τ*, τ_w); None (delegate nothing) when the window certified nothing."""
        offline = self.rule.threshold
        if offline is None or w.blocked:
            return None
        return offline if w.threshold is None else max(offline, w.threshold)

    def _decide_one(self, signal: float, w: ScopeWindow) -> Delegation:
        tau = self.applied_threshold(w)
        window_tau = w.threshold
        wanted = tau is not None and signal > tau
        delegated, refused = wanted, False
        if self.refill is not None:
            w.tokens = min(Fraction(self.config.cap_burst), w.tokens + self.refill)
            if wanted:
                if w.tokens >= 1:
                    w.tokens -= 1
                else:
                    delegated, refused = False, True
            self._cap_episode(w, refused)
        w.push(signal, delegated)
        if w.since_recertify >= self.config.recertify_every and len(w.signals) >= self.config.min_window:
            self._recertify(w)
        self._check_rate(w)
        rate = w.rate
        state = w.state
        # Consecutive events mostly see the same rule (the rate moves only when the decision leaving the window
        # differs from the one entering it): the frozen state is shared rather than validated again per event.
        if (state is None or state.threshold != tau or state.window_threshold != window_tau
                or state.window_rate != rate or state.cap_binding != refused):
            state = w.state = BudgetState(
                alpha=self.rule.alpha, threshold=tau, offline_threshold=self.rule.threshold,
                window_threshold=window_tau, window_rate=rate, cap_binding=refused, valid=True)
        return Delegation(delegated=delegated, signal=self.rule.signal, value=signal, budget=state)

    def _cap_episode(self, w: ScopeWindow, refused: bool) -> None:
        if refused:
            w.cap_hits += 1
            if self.metrics is not None:
                self.metrics.cap_hits.inc()
            if not w.cap_binding:
                w.cap_binding = True
                log.warning("budget.cap_binding", scope=w.key, alpha=self.rule.alpha, window_rate=w.rate,
                            cap_hits=w.cap_hits)
        elif w.cap_binding and w.tokens == self.config.cap_burst:
            # An episode ends when the bucket is full again, so a cap that binds on and off logs once.
            w.cap_binding = False
            log.info("budget.cap_released", scope=w.key, cap_hits=w.cap_hits)

    def _recertify(self, w: ScopeWindow) -> None:
        """Label-free LTT on the window: the smallest threshold whose rate passes FST at level δ."""
        assert self.rule.alpha is not None and self.rule.threshold is not None
        values = np.fromiter(w.signals, dtype=np.float64, count=len(w.signals))
        grid = threshold_grid(values, self.grid_size)  # highest τ first, as the test requires
        certified = fixed_sequence_test(delegation_rates(values, grid), values.size, self.rule.alpha,
                                        self.config.delta)
        w.since_recertify = 0
        w.recertifications += 1
        outcome: RecertOutcome
        if certified:
            w.threshold, w.blocked = float(grid[certified - 1]), False
            outcome = "tightened" if w.threshold > self.rule.threshold else "offline"
        else:
            w.threshold, w.blocked = None, True
            outcome = "uncertified"
        if self.metrics is not None:
            self.metrics.recertifications.labels(outcome=outcome).inc()
        if outcome != w.outcome:
            # Log when what governs the decision changes, not every re-certification.
            event = "budget.window_uncertified" if outcome == "uncertified" else "budget.window_recertified"
            (log.warning if outcome != "offline" else log.info)(
                event, scope=w.key, outcome=outcome, window_threshold=w.threshold,
                offline_threshold=self.rule.threshold, window=values.size, window_rate=w.rate,
            )
            w.outcome = outcome

    def hoeffding_margin(self, n: int) -> float:
        return math.sqrt(self._log_inv_delta / (2 * n))

    def _check_rate(self, w: ScopeWindow) -> None:
        assert self.rule.alpha is not None
        n = len(w.decisions)
        rate = w.rate
        exceeded = (n >= self.config.min_window and rate is not None
                    and rate - self.hoeffding_margin(n) > self.rule.alpha)
        if exceeded != w.exceeded:
            w.exceeded = exceeded
            if exceeded:
                log.warning("budget.exceeded", scope=w.key, window_rate=rate, window=n, alpha=self.rule.alpha,
                            margin=self.hoeffding_margin(n))
            else:
                log.info("budget.back_within", scope=w.key, window_rate=rate, window=n, alpha=self.rule.alpha)

    def _update_gauges(self) -> None:
        """One value per scope label; several windows under one label (``other``) report the worst one: the
        tightest threshold, the highest rate. ``ctd_delegation_threshold`` is the worst over all windows."""
        m = self.metrics
        if m is None or not self.windows:
            return
        scopes: dict[str, list[ScopeWindow]] = collections.defaultdict(list)
        for w in self.windows.values():
            scopes[self.scope_label(w.key)].append(w)
        for label, windows in scopes.items():
            certified = [w.threshold for w in windows if w.threshold is not None]
            rates = [w.rate for w in windows if w.rate is not None]
            m.window_threshold.labels(scope=label).set(max(certified) if certified else math.nan)
            m.window_delegation_rate.labels(scope=label).set(max(rates) if rates else math.nan)
            m.budget_exceeded.labels(scope=label).set(1 if any(w.exceeded for w in windows) else 0)
        for gone in self._scope_labels - scopes.keys():  # an evicted window, or a tenant whose label went
            for gauge in (m.window_threshold, m.window_delegation_rate, m.budget_exceeded):
                gauge.remove(gone)
        self._scope_labels = set(scopes)
        applied = [t for t in (self.applied_threshold(w) for w in self.windows.values()) if t is not None]
        m.threshold.set(max(applied) if applied else math.nan)
