"""The live budget controller on seeded synthetic signal streams (no Kafka, no model)."""

from __future__ import annotations

import numpy as np
import pytest
import structlog
from scipy.stats import norm

from probes.errors import ConfigError
from probes.runtime.monitor import DelegationRule
from worker.budget import WORKER_SCOPE, BudgetController, Delegation
from worker.config import BudgetConfig
from worker.metrics import WorkerMetrics

ALPHA = 0.1
OFFLINE_RATE = 0.06  # the offline threshold's rate on normal traffic (certified well inside α)
TAU = float(norm.ppf(1 - OFFLINE_RATE))
RULE = DelegationRule("dv", TAU, ALPHA)
W = 1000


def shift_mean(rate: float) -> float:
    """Mean of N(μ, 1) whose rate above the offline threshold is ``rate``."""
    return TAU - float(norm.ppf(1 - rate))


def stream(seed: int, *phases: tuple[float, int]) -> np.ndarray:
    """Concatenated N(μ, 1) phases: (rate above the offline threshold, length)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(shift_mean(rate), 1.0, n) for rate, n in phases])


def config(**overrides: object) -> BudgetConfig:
    base: dict[str, object] = {"window": W, "min_window": 500, "recertify_every": 100, "delta": 0.05}
    return BudgetConfig(**{**base, **overrides})  # type: ignore[arg-type]


def run(controller: BudgetController, x: np.ndarray, partitions: list[int] | None = None) -> list[Delegation]:
    return controller.decide(x, partitions if partitions is not None else [0] * x.size)


def full_window_rates(delegated: np.ndarray, window: int = W) -> np.ndarray:
    counts = np.concatenate([[0], np.cumsum(delegated)])
    return (counts[window:] - counts[:-window]) / window


def flags(decisions: list[Delegation]) -> np.ndarray:
    return np.array([d.delegated for d in decisions])


def test_a_rate_doubling_shift_is_held_within_the_bound_and_control_returns_to_the_offline_threshold() -> None:
    normal, shifted = (OFFLINE_RATE, 3000), (2 * OFFLINE_RATE * 1.1, 6000)  # the shift more than doubles it
    x = stream(1, normal, shifted, (OFFLINE_RATE, 4000))
    controller = BudgetController(RULE, config())
    decisions = run(controller, x)
    offline = full_window_rates(RULE.decide(x))
    windowed = full_window_rates(flags(decisions))
    # The injected shift really breaks the offline threshold's budget ...
    assert offline[3000:9000 - W].min() > ALPHA
    # ... the controller keeps every full window within the Hoeffding margin of α (its monitor never fires) ...
    assert windowed.max() <= ALPHA + controller.hoeffding_margin(W)
    # ... and within α itself once the window holds only shifted traffic (the window FST's guarantee).
    settled = 3000 + W + controller.config.recertify_every
    assert windowed[settled:9000 - W + 1].max() <= ALPHA
    assert all(d.budget.threshold is not None and d.budget.threshold > TAU for d in decisions[settled:9000])
    # Back to normal: once the window has turned over, the offline threshold governs again.
    assert all(d.budget.threshold == TAU for d in decisions[9000 + W + 100:])
    assert decisions[-1].budget.window_threshold is not None and decisions[-1].budget.window_threshold < TAU
    # Before min_window events the offline rule decides alone.
    assert all(d.budget.window_threshold is None and d.budget.threshold == TAU for d in decisions[:500])
    assert flags(decisions[:500]).tolist() == RULE.decide(x[:500]).tolist()


@pytest.mark.parametrize("burst_rate", [0.2, 0.6])
def test_the_hard_cap_keeps_every_full_window_and_every_prefix_within_alpha(burst_rate: float) -> None:
    x = stream(2, (OFFLINE_RATE, 2000), (burst_rate, 3000), (OFFLINE_RATE, 3000))
    metrics = WorkerMetrics()
    controller = BudgetController(RULE, config(hard_cap=True, cap_burst=20), metrics)
    with structlog.testing.capture_logs() as logs:
        decisions = run(controller, x)
    delegated = flags(decisions)
    assert full_window_rates(delegated).max() <= ALPHA
    assert (np.cumsum(delegated) <= ALPHA * np.arange(1, x.size + 1)).all()
    refused = sum(d.budget.cap_binding for d in decisions)
    assert refused > 0 and refused == controller.windows[-1].cap_hits
    assert metrics.registry.get_sample_value("ctd_budget_cap_hits_total") == refused
    assert not any(d.delegated and d.budget.cap_binding for d in decisions)
    binding = [e for e in logs if e["event"] == "budget.cap_binding"]
    assert 1 <= len(binding) <= 5  # one line per binding episode, not per refusal


def test_the_cap_burst_must_leave_room_under_alpha() -> None:
    with pytest.raises(ConfigError, match="cap_burst"):
        BudgetController(RULE, config(hard_cap=True, cap_burst=100))  # α·W = 100


def test_decisions_are_deterministic_and_do_not_depend_on_batching() -> None:
    x = stream(3, (OFFLINE_RATE, 1500), (0.3, 2500))
    cfg = config(hard_cap=True)
    whole = run(BudgetController(RULE, cfg), x)
    again = run(BudgetController(RULE, cfg), x)
    chunked_controller = BudgetController(RULE, cfg)
    chunked = [d for part in np.array_split(x, 37) for d in run(chunked_controller, part)]
    assert whole == again == chunked
    assert any(d.budget.window_threshold is not None for d in whole)


def test_the_sequential_monitor_flags_a_significant_excess_and_clears_after() -> None:
    # Never re-certifying leaves the offline threshold alone in charge: the monitor must catch the excess.
    x = stream(4, (OFFLINE_RATE, 1500), (0.4, 1500), (OFFLINE_RATE, 2500))
    metrics = WorkerMetrics()
    controller = BudgetController(RULE, config(recertify_every=10**9), metrics)
    with structlog.testing.capture_logs() as logs:
        run(controller, x[:1500])
        assert metrics.budget_exceeded.labels(scope="worker")._value.get() == 0
        run(controller, x[1500:3000])
        assert metrics.budget_exceeded.labels(scope="worker")._value.get() == 1
        run(controller, x[3000:])
    assert metrics.budget_exceeded.labels(scope="worker")._value.get() == 0
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["budget.exceeded"]  # one per episode
    exceeded = next(e for e in logs if e["event"] == "budget.exceeded")
    assert exceeded["window_rate"] - exceeded["margin"] > ALPHA and "text" not in exceeded


def test_gauges_and_counters_follow_the_window() -> None:
    metrics = WorkerMetrics()
    controller = BudgetController(RULE, config(), metrics)
    decisions = run(controller, stream(5, (OFFLINE_RATE, 1200), (0.3, 1500)))
    w = controller.windows[-1]
    assert w.threshold is not None and w.threshold > TAU
    assert metrics.window_threshold.labels(scope="worker")._value.get() == w.threshold == controller.applied_threshold(w)
    assert metrics.threshold._value.get() == w.threshold
    assert metrics.window_delegation_rate.labels(scope="worker")._value.get() == w.rate == decisions[-1].budget.window_rate
    get = metrics.registry.get_sample_value
    offline = get("ctd_window_recertifications_total", {"outcome": "offline"}) or 0
    tightened = get("ctd_window_recertifications_total", {"outcome": "tightened"}) or 0
    assert tightened > 0 and offline > 0 and offline + tightened == w.recertifications == (2700 - 500) // 100 + 1


def test_a_window_that_certifies_nothing_delegates_nothing() -> None:
    # With α = 0.01 even "delegate nothing" fails the test on 60 events: (1 − 0.01)^60 > δ.
    rule = DelegationRule("dv", TAU, 0.01)
    metrics = WorkerMetrics()
    controller = BudgetController(rule, config(window=60, min_window=60, recertify_every=10), metrics)
    decisions = run(controller, stream(6, (0.3, 200)))
    assert any(d.delegated for d in decisions[:60])
    assert not any(d.delegated for d in decisions[60:]) and decisions[-1].budget.threshold is None
    assert metrics.registry.get_sample_value("ctd_window_recertifications_total", {"outcome": "uncertified"}) > 0


def test_without_a_valid_offline_threshold_nothing_is_delegated() -> None:
    rule = DelegationRule("dv", None, None, variant="uncalibrated")
    controller = BudgetController(rule, config(hard_cap=True))
    decisions = run(controller, stream(7, (0.5, 300)))
    assert not any(d.delegated for d in decisions)
    assert all(not d.budget.valid and d.budget.threshold is None for d in decisions)
    assert controller.windows == {}


def test_partition_scope_keeps_one_window_per_partition_across_a_rebalance() -> None:
    controller = BudgetController(RULE, config(scope="partition"))
    shifted, normal = stream(8, (0.3, 1500)), stream(9, (OFFLINE_RATE, 1500))
    run(controller, shifted, [0] * 1500)
    run(controller, normal, [1] * 1500)
    p0, p1 = controller.windows[0], controller.windows[1]
    assert p0.threshold is not None and p0.threshold > TAU  # the shifted partition tightened ...
    assert controller.applied_threshold(p1) == TAU  # ... the normal one did not
    # Partition 0 revoked, then assigned back: its window was kept and resumes where it stopped.
    before = (p0.seen, p0.threshold, list(p0.signals))
    assert run(controller, stream(10, (0.3, 1)), [0])[0].budget.window_threshold == before[1]
    assert p0.seen == before[0] + 1 and list(p0.signals)[:-1] == before[2][1:]
    # A partition this worker never saw starts at the offline threshold.
    fresh = run(controller, stream(11, (0.3, 5)), [7] * 5)
    assert all(d.budget.threshold == TAU and d.budget.window_threshold is None for d in fresh)


def test_worker_scope_shares_one_window_whatever_the_partitions() -> None:
    controller = BudgetController(RULE, config())
    x = stream(12, (0.3, 1200))
    run(controller, x, [i % 4 for i in range(x.size)])
    assert list(controller.windows) == [-1] and controller.windows[-1].seen == 1200


def test_a_non_finite_signal_is_never_delegated_and_stays_out_of_the_window() -> None:
    controller = BudgetController(RULE, config(window=50, min_window=50, recertify_every=10))
    x = stream(13, (0.3, 120))
    x[::7] = np.nan
    decisions = run(controller, x)
    assert not any(d.delegated for d, v in zip(decisions, x, strict=True) if np.isnan(v))
    w = controller.windows[-1]
    assert w.threshold is not None and np.isfinite(list(w.signals)).all() and len(w.decisions) == 50


def _interleave(seed: int, flood: np.ndarray, quiet: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The flood and the quiet tenant's events merged in a seeded random order (each keeps its own order)."""
    rng = np.random.default_rng(seed)
    owners = np.array(["flood"] * flood.size + ["quiet"] * quiet.size)
    rng.shuffle(owners)
    signals = np.empty(owners.size)
    signals[owners == "flood"], signals[owners == "quiet"] = flood, quiet
    return signals, owners.tolist()


@pytest.mark.parametrize("hard_cap", [False, True])
def test_tenant_scope_keeps_a_flooding_tenant_off_the_others_budget(hard_cap: bool) -> None:
    """One tenant floods the stream with borderline traffic (5x the events, 4x the delegation rate). Under scope
    "tenant" the quiet tenant's decisions are exactly what they are without the flood; under the shared
    worker scope the flood spends the quiet tenant's budget."""
    quiet = stream(21, (OFFLINE_RATE, 1500))
    flood = stream(22, (4 * OFFLINE_RATE, 7500))
    signals, owners = _interleave(23, flood, quiet)
    mine = [i for i, o in enumerate(owners) if o == "quiet"]

    alone = flags(BudgetController(RULE, config(scope="tenant", hard_cap=hard_cap)).decide(
        quiet, [0] * quiet.size, ["quiet"] * quiet.size))
    isolated = BudgetController(RULE, config(scope="tenant", hard_cap=hard_cap))
    with_flood = flags(isolated.decide(signals, [0] * signals.size, owners))[mine]
    np.testing.assert_array_equal(with_flood, alone)
    assert set(isolated.windows) == {"t:flood", "t:quiet"}
    assert isolated.windows["t:flood"].threshold is not None and isolated.windows["t:flood"].threshold > TAU

    shared = flags(BudgetController(RULE, config(hard_cap=hard_cap)).decide(signals, [0] * signals.size))[mine]
    assert shared.sum() < alone.sum() * 0.8, "without isolation the flood takes the quiet tenant's budget"


def test_tenant_windows_are_bounded() -> None:
    controller = BudgetController(RULE, config(scope="tenant", max_scopes=3))
    x = stream(24, (OFFLINE_RATE, 10))
    controller.decide(x, [0] * 10, [f"t{i}" for i in range(10)])
    assert len(controller.windows) == 4 and controller.windows["*"].seen == 7
    with pytest.raises(ValueError, match="tenant"):
        controller.decide(x[:1], [0])


def test_partition_scope_gauges_carry_each_partition() -> None:
    metrics = WorkerMetrics()
    controller = BudgetController(RULE, config(scope="partition"), metrics)
    run(controller, stream(14, (0.3, 1500)), [0] * 1500)
    run(controller, stream(15, (OFFLINE_RATE, 1500)), [1] * 1500)
    get = metrics.registry.get_sample_value
    for p in (0, 1):
        w = controller.windows[p]
        assert get("ctd_window_delegation_rate", {"scope": str(p)}) == w.rate
        assert get("ctd_budget_exceeded", {"scope": str(p)}) == (1 if w.exceeded else 0)
    assert get("ctd_window_threshold", {"scope": "0"}) > TAU  # the shifted partition's, not the worst of both
    assert get("ctd_window_threshold", {"scope": "1"}) <= TAU
    assert get("ctd_window_delegation_rate", {"scope": "worker"}) is None
    assert metrics.threshold._value.get() == controller.applied_threshold(controller.windows[0])  # the worst


def test_each_event_carries_the_rule_as_applied_to_it_though_states_are_shared() -> None:
    """Events that see the same rule share one frozen BudgetState; each still reads its own window's rate,
    thresholds and cap refusal, as a state built afresh for every event would."""
    x = stream(7, (OFFLINE_RATE, 1500), (3 * OFFLINE_RATE, 1500))
    settings = config(hard_cap=True, cap_burst=5)
    shared = BudgetController(RULE, settings).decide(x, [0] * x.size)
    fresh = BudgetController(RULE, settings)
    afresh: list[Delegation] = []
    for value in x:
        if (window := fresh.windows.get(WORKER_SCOPE)) is not None:
            window.state = None  # nothing to share: built afresh
        afresh += fresh.decide([value], [0])
    assert shared == afresh
    assert len({id(d.budget) for d in shared}) < x.size // 2  # shared indeed
    assert any(d.budget.cap_binding for d in shared) and any(d.budget.window_threshold for d in shared)
