"""Drift simulator: a stream whose mix shifts, replayed through the budget controller (no Kafka).

Real records are scored once with a bundle (a seeded pool per source file); each phase of the stream draws
events from its sources' pools, so a phase is a traffic mix, e.g. the bundle's own training mix, then a burst of
jailbreak prompts, then a source the probes never saw, then the training mix again. The same signal stream
goes through three policies: the offline threshold only, windowed control (``worker.budget``), and windowed
control with the hard cap, and the realised delegation rate over every full window is compared with α.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from probes.data import Record, read_file
from probes.errors import ConfigError
from probes.runtime.monitor import DelegationRule, Monitor, head_scores
from worker.budget import BudgetController
from worker.config import BudgetConfig

F64 = npt.NDArray[np.float64]
POLICIES = ("offline", "windowed", "capped")


@dataclass(frozen=True)
class Phase:
    """``events`` stream events drawn from the pooled records of ``files``."""

    name: str
    files: tuple[Path, ...]
    events: int


def parse_phase(spec: str, datasets_dir: Path) -> Phase:
    """``NAME=FILE[+FILE...]:EVENTS``; relative files are looked up in ``datasets_dir``."""
    try:
        name, rest = spec.split("=", 1)
        files, events = rest.rsplit(":", 1)
        count = int(events)
    except ValueError as exc:
        raise ConfigError(f"phase {spec!r} is not NAME=FILE[+FILE...]:EVENTS") from exc
    if not name or count < 1:
        raise ConfigError(f"phase {spec!r} needs a name and at least one event")
    paths = tuple(p if p.is_absolute() else datasets_dir / p for p in (Path(f) for f in files.split("+")))
    return Phase(name, paths, count)


def default_phases(normal: Sequence[str], datasets_dir: Path, events: int) -> list[Phase]:
    """Training mix → jailbreak burst → a source the probes never saw (tweets) → training mix again."""
    mix = tuple(datasets_dir / f for f in normal)
    return [
        Phase("normal", mix, events),
        Phase("jailbreak", (datasets_dir / "jailbreak_prompts_itw.jsonl",), events),
        Phase("unseen", (datasets_dir / "davidson_hate_offensive.jsonl",), events),
        Phase("normal again", mix, events),
    ]


def score_records(monitor: Monitor, records: Sequence[Record]) -> F64:
    """The delegation signal the bundle's rule reads, for each record."""
    features = monitor.extractor.pooled([r.messages for r in records], monitor.pooling)
    return head_scores(monitor.bundle, features, monitor.rule.signal).signal


def score_pools(monitor: Monitor, files: Sequence[Path], pool: int, seed: int) -> dict[Path, F64]:
    """A seeded sample of ``pool`` records per file, scored in one pass."""
    rng = np.random.default_rng(seed)
    chosen: dict[Path, list[Record]] = {}
    for path in dict.fromkeys(files):
        records = read_file(path)
        picks = rng.choice(len(records), size=min(pool, len(records)), replace=False)
        chosen[path] = [records[i] for i in sorted(picks)]
    signals = score_records(monitor, [r for rs in chosen.values() for r in rs])
    out: dict[Path, F64] = {}
    start = 0
    for path, rs in chosen.items():
        out[path] = signals[start:start + len(rs)]
        start += len(rs)
    return out


def build_stream(phases: Sequence[Phase], pools: dict[Path, F64], seed: int) -> F64:
    """Each phase's events drawn with replacement, every source of the phase equally likely."""
    rng = np.random.default_rng(seed)
    parts = []
    for phase in phases:
        source = rng.integers(len(phase.files), size=phase.events)
        part = np.empty(phase.events, dtype=np.float64)
        for i, path in enumerate(phase.files):
            idx = np.flatnonzero(source == i)
            part[idx] = rng.choice(pools[path], size=idx.size)
        parts.append(part)
    return np.concatenate(parts)


def full_window_rates(delegated: npt.ArrayLike, window: int) -> F64:
    """Realised rate of each full window of ``window`` consecutive events (index i: events i … i+window−1)."""
    flags = np.asarray(delegated, dtype=np.float64)
    counts = np.concatenate([[0.0], np.cumsum(flags)])
    return np.asarray((counts[window:] - counts[:-window]) / window, dtype=np.float64)


def simulate(signals: F64, rule: DelegationRule, config: BudgetConfig) -> dict[str, dict[str, Any]]:
    """Decisions and applied thresholds of each policy on one stream (one worker, one window)."""
    out: dict[str, dict[str, Any]] = {
        "offline": {"delegated": rule.decide(signals), "threshold": np.full(signals.size, np.nan if rule.threshold is None else rule.threshold),
                    "cap_hits": 0},
    }
    for policy, cap in (("windowed", False), ("capped", True)):
        controller = BudgetController(rule, config.model_copy(update={"hard_cap": cap}))
        decisions = controller.decide(signals, [0] * signals.size)
        out[policy] = {
            "delegated": np.array([d.delegated for d in decisions]),
            "threshold": np.array([np.nan if d.budget.threshold is None else d.budget.threshold for d in decisions]),
            "cap_hits": sum(w.cap_hits for w in controller.windows.values()),
        }
    return out


def summarize(traces: dict[str, dict[str, Any]], phases: Sequence[Phase], alpha: float, window: int,
              margin: float) -> dict[str, Any]:
    bounds = np.cumsum([0] + [p.events for p in phases])
    policies: dict[str, Any] = {}
    for policy, trace in traces.items():
        delegated = trace["delegated"]
        rates = full_window_rates(delegated, window)
        policies[policy] = {
            "overall_rate": float(delegated.mean()),
            "phase_rates": [float(delegated[a:b].mean()) for a, b in itertools.pairwise(bounds)],
            "peak_window_rate": float(rates.max()) if rates.size else None,
            "windows_over_alpha": float((rates > alpha).mean()) if rates.size else None,
            "windows_over_bound": float((rates > alpha + margin).mean()) if rates.size else None,
            "max_threshold": float(np.nanmax(trace["threshold"])) if np.isfinite(trace["threshold"]).any() else None,
            "cap_hits": int(trace["cap_hits"]),
        }
    return {
        "alpha": alpha, "window": window, "hoeffding_bound": alpha + margin, "events": int(bounds[-1]),
        "phases": [{"name": p.name, "files": [f.name for f in p.files], "start": int(a), "events": p.events}
                   for p, a in zip(phases, bounds[:-1], strict=True)],
        "policies": policies,
    }


def plot(traces: dict[str, dict[str, Any]], summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window, alpha = int(summary["window"]), float(summary["alpha"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for policy, trace in traces.items():
        rates = full_window_rates(trace["delegated"], window)
        ax.plot(np.arange(window, window + rates.size), rates, label=policy, lw=1.4)
    ax.axhline(alpha, color="black", ls="--", lw=1, label=f"α = {alpha:g}")
    ax.axhline(summary["hoeffding_bound"], color="grey", ls=":", lw=1, label="α + Hoeffding margin")
    for phase in summary["phases"]:
        ax.axvline(phase["start"], color="grey", lw=0.6)
        ax.text(phase["start"], 1.0, f" {phase['name']}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    ax.set_xlabel("event (window end)")
    ax.set_ylabel(f"realised delegation rate (last {window})")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def drift_stream(monitor: Monitor, phases: Sequence[Phase], *, pool: int = 200,
                 seed: int = 0) -> tuple[F64, dict[Path, F64]]:
    """The stream's signals, and the scored pools they were drawn from."""
    pools = score_pools(monitor, [f for p in phases for f in p.files], pool, seed)
    return build_stream(phases, pools, seed), pools


def report(signals: F64, pools: dict[Path, F64], phases: Sequence[Phase], rule: DelegationRule,
           config: BudgetConfig, out: Path) -> dict[str, Any]:
    """Run every policy; write ``drift.png`` and ``drift.json`` to ``out`` and return the summary."""
    if rule.threshold is None or rule.alpha is None:
        raise ConfigError("the bundle has no valid delegation threshold: there is no budget to control")
    traces = simulate(signals, rule, config)
    margin = BudgetController(rule, config).hoeffding_margin(config.window)
    summary = summarize(traces, phases, rule.alpha, config.window, margin)
    summary["offline_threshold"] = rule.threshold
    summary["signal"] = rule.signal
    summary["pool_offline_rates"] = {p.name: float(rule.decide(pools[p]).mean()) for p in pools}
    summary["plot"] = str(plot(traces, summary, out / "drift.png"))
    (out / "drift.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return summary
