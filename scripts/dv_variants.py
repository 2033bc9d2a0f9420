"""DV head variants against uncertainty delegation on one trained bundle (the issue-3 investigation).

Each variant is a different way to predict "escalating this item fixes the probe"; every one is calibrated
with the same LTT procedure on the bundle's calibration split at each budget and applied as is to the
evaluation records, exactly like ``ctd-monitor evaluate``. Prints JSON: signal quality (Spearman with the
true continuous v, AUROC for "delegation helps"), accuracy / AUROC / realised rate per budget, and FAIC.

    python scripts/dv_variants.py --bundle runs/bundle [--data FILE ...] [--budgets 0.05,0.1,0.2,0.3]

The bundle must have been through ``train`` and ``train-dv`` (see scripts/evaluate.sh).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from probes.config import Settings, load_settings
from probes.data import read_file
from probes.evaluation.cascade import CascadeContext, Scored, dv_training_data
from probes.evaluation.policies import (
    calibrated_delegation,
    decision_metrics,
    faic,
    oracle_delegation,
    policy_row,
)
from probes.fitting.dv import Target, dv_binary, signal_quality
from probes.fitting.heads import fit_dv, fit_router
from probes.heads.inference import with_extra_features
from probes.logs import configure_logging
from probes.runtime.manifest import Signal as SignalName

F64 = npt.NDArray[np.float64]
Signal = Callable[[Scored], F64]


def variants(ctx: CascadeContext) -> dict[str, Signal]:
    """name → signal function; the fitted variants learn from the bundle's own DV training data only."""
    seed = ctx.settings.data.splits.seed
    crossfit, dev = dv_training_data(ctx, "crossfit"), dv_training_data(ctx, "dev")
    out: dict[str, Signal] = {
        "dv_bundle": lambda s: ctx.signal(SignalName.DV, s),
        "uncertainty": lambda s: ctx.signal(SignalName.UNCERTAINTY, s),
        "router_bundle": lambda s: ctx.signal(SignalName.ROUTER, s),
    }

    def linear(data: Scored, target: Target) -> Signal:
        fit = fit_dv(data.features, data.y, data.p, data.b, target=target, feature_sets=("full",), seed=seed)
        return lambda s: fit.head.logit(fit.inputs(s.features, s.p))

    out["full_binary_crossfit"] = linear(crossfit, "binary")
    out["full_continuous_crossfit"] = linear(crossfit, "continuous")
    out["full_binary_dev"] = linear(dev, "binary")
    mlp = fit_router(with_extra_features(crossfit.features, crossfit.p), dv_binary(crossfit.y, crossfit.p, crossfit.b),
                     seed=seed)
    out["mlp_extras_crossfit"] = lambda s: mlp.proba(with_extra_features(s.features, s.p))
    return out


def measure(ctx: CascadeContext, signals: dict[str, Signal], evaluation: Scored, budgets: list[float],
            delta: float) -> dict[str, Any]:
    cal = ctx.split("calibration")
    cuts = ctx.cuts
    report: dict[str, Any] = {
        "n": len(evaluation.records),
        "probe_only": decision_metrics(evaluation.y, evaluation.p, evaluation.p >= cuts.probe),
        "expert_only": decision_metrics(evaluation.y, evaluation.b, evaluation.b >= cuts.expert),
        "helps": int(dv_binary(evaluation.y, evaluation.p, evaluation.b).sum()),
        "policies": {}, "signal_quality": {},
    }
    for name, signal in signals.items():
        cal_values, eval_values = signal(cal), signal(evaluation)
        report["signal_quality"][name] = signal_quality(eval_values, evaluation.y, evaluation.p, evaluation.b)
        report["policies"][name] = [
            policy_row(evaluation, alpha, *calibrated_delegation(
                ctx, cal, evaluation, None, alpha, delta=delta, variant="pareto", cal_values=cal_values,
                eval_values=eval_values), cuts)[0]
            for alpha in budgets]
    report["policies"]["oracle"] = [
        policy_row(evaluation, alpha, None, True, oracle_delegation(evaluation, alpha), cuts)[0] for alpha in budgets]
    report["faic"] = {name: faic(report, name) for name in signals}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("runs/bundle"))
    parser.add_argument("--data", type=Path, nargs="*", help="evaluation file(s); default: the evaluation split")
    parser.add_argument("--budgets", default="0.05,0.1,0.2,0.3")
    parser.add_argument("--delta", type=float, default=0.1)
    args = parser.parse_args()
    budgets = [float(x) for x in args.budgets.split(",") if x.strip()]
    settings: Settings = load_settings(None)
    configure_logging(settings.log_level)  # JSON logs on stderr: stdout is the report
    ctx = CascadeContext(settings, args.bundle)
    records = [r for path in args.data for r in read_file(path)] if args.data else list(ctx.prepared.splits.evaluation)
    report = measure(ctx, variants(ctx), ctx.score(records), budgets, args.delta)
    report["files"] = [str(p) for p in args.data] if args.data else ["<bundle evaluation split>"]
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
