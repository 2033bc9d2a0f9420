"""The demo's (ε, α) offline: the cuts, DV head and delegation threshold calibrated as ``ctd-monitor demo`` does
(ensure_bundle), then the cascade's decisions on the bundle's evaluation split (exchangeable with calibration) and on
the demo's held-out replay records (no live budget window: the stream's realised delegation can only be lower).

    python scripts/demo_sweep.py --bundle runs/demo/bundle [--epsilons 0.05,0.08,0.1] [--alphas 0.2,0.3] [--seed 0]

Works on a copy of the bundle (``--scratch``); prints one JSON row per (ε, α, variant): recall, benign flag rate
(fpr), precision and F1 of probe-only, cascade and expert-only, the delegated share, and how many delegated events
the expert fixes (probe wrong, expert right at the cuts) or breaks (the reverse), of all it could fix.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ctd_monitor.local.demo import DemoOptions, demo_settings, held_out_records
from probes.calibration.cascade_rule import Cuts, cascade_decisions, cascade_scores
from probes.config import load_settings
from probes.evaluation.cascade import (
    CascadeContext,
    Scored,
    calibrate_cuts,
    calibrate_long,
    calibrate_signal,
    train_dv,
    write_cuts,
)
from probes.fitting.dv import dv_binary
from probes.logs import configure_logging
from probes.metrics import decision_metrics
from probes.runtime.manifest import Signal


def figures(y: Any, scores: Any, flags: Any) -> dict[str, float]:
    m = decision_metrics(y, scores, flags)
    return {k: round(m[k], 3) for k in ("recall", "fpr", "precision", "f1")}


def on(ctx: CascadeContext, scored: Scored, threshold: float | None, cuts: Cuts) -> dict[str, Any]:
    signal = ctx.signal(Signal.DV, scored)
    delegated = signal > threshold if threshold is not None else np.zeros(len(signal), dtype=bool)
    fixes = dv_binary(scored.y, scored.p, scored.b, cuts).astype(bool)
    breaks = ((scored.p >= cuts.probe) == scored.y) & ((scored.b >= cuts.expert) != scored.y)
    return {
        "probe": figures(scored.y, scored.p, scored.p >= cuts.probe),
        "cascade": figures(scored.y, cascade_scores(delegated, scored.p, scored.b),
                           cascade_decisions(delegated, scored.p, scored.b, cuts)),
        "expert": figures(scored.y, scored.b, scored.b >= cuts.expert),
        "delegated": round(float(delegated.mean()), 3), "fixes_delegated": int((fixes & delegated).sum()),
        "fixes_all": int(fixes.sum()), "breaks_delegated": int((breaks & delegated).sum()), "n": len(signal),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle `ctd-monitor demo` trained")
    parser.add_argument("--scratch", type=Path, default=Path("runs/demo-sweep/bundle"))
    parser.add_argument("--epsilons", default="0.05,0.08,0.1,0.12,0.15")
    parser.add_argument("--alphas", default="0.2,0.3")
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shutil.rmtree(args.scratch, ignore_errors=True)
    shutil.copytree(args.bundle, args.scratch)
    loaded = load_settings()
    configure_logging(loaded.log_level)  # JSON logs on stderr: stdout is the rows
    settings = demo_settings(loaded, DemoOptions(events=args.events, seed=args.seed))
    ctx = CascadeContext(settings, args.scratch)
    calibration, evaluation = ctx.split("calibration"), ctx.split("evaluation")
    replay = ctx.score(held_out_records(settings, args.events, args.seed))
    for epsilon in (float(e) for e in args.epsilons.split(",")):
        probe_cut, expert_cut = calibrate_cuts(ctx, calibration, epsilon=epsilon, delta=args.delta)
        write_cuts(ctx, probe_cut, expert_cut, calibrate_long(ctx, epsilon=epsilon, delta=args.delta))
        train_dv(ctx, epsilon=epsilon, delta=args.delta)
        for alpha in (float(a) for a in args.alphas.split(",")):
            for variant in ("pareto", "budget"):
                result = calibrate_signal(ctx, calibration, Signal.DV, alpha=alpha, delta=args.delta,
                                          variant=variant, seed=args.seed)
                row = {"epsilon": epsilon, "alpha": alpha, "variant": variant,
                       "cuts": {"probe": probe_cut.cut, "expert": expert_cut.cut},
                       "calibration_fpr": {"probe": probe_cut.fpr, "expert": expert_cut.fpr},
                       "threshold": result.threshold, "certified": result.certified, "tested": result.tested,
                       "ht_rate": result.ht_rate,
                       "evaluation": on(ctx, evaluation, result.threshold, ctx.cuts),
                       "replay": on(ctx, replay, result.threshold, ctx.cuts)}
                sys.stdout.write(orjson.dumps(row).decode() + "\n")
                sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
