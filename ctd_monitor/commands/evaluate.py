"""``evaluate``, ``validate-guarantee``, ``evaluate-stream``: quality of a calibrated bundle, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import orjson
import typer

from ctd_monitor.commands.common import BundleOpt, emit, fail, guarded, options, settings
from ctd_monitor.progress import console, progress_bars
from probes.runtime.manifest import SIGNAL_NAMES


@guarded
def evaluate(
    ctx: typer.Context,
    bundle: BundleOpt = Path("runs/bundle"),
    data: Annotated[list[Path] | None, typer.Option("--data", help="evaluation file(s); default: evaluation split")] = None,
    budgets: Annotated[str, typer.Option(help="comma-separated budgets")] = "0.05,0.1,0.2,0.3",
    delta: Annotated[float, typer.Option(help="δ used to calibrate each budget")] = 0.1,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/eval"),
) -> None:
    """Every policy at every budget (calibrated on the calibration split, applied as is): metrics, plots, report."""
    from probes.evaluation.cascade import CascadeContext
    from probes.evaluation.policies import evaluation_report, write_report

    try:
        alphas = [float(x) for x in budgets.split(",") if x.strip()]
    except ValueError:
        fail(f"--budgets must be comma-separated numbers, got {budgets!r}")
    s = settings(ctx)
    out.mkdir(parents=True, exist_ok=True)
    with progress_bars(options(ctx).progress) as bars:
        report = evaluation_report(CascadeContext(s, bundle, bars), data, alphas, delta=delta)
    (out / "metrics.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    write_report(report, out)
    emit({"out": str(out), "n": report["n"], "probe_only": report["probe_only"], "expert_only": report["expert_only"],
          "faic": report["faic"]})


@guarded
def validate_guarantee(
    ctx: typer.Context,
    bundle: BundleOpt = Path("runs/bundle"),
    data: Annotated[list[Path] | None, typer.Option("--data", help="file(s); default: calibration+evaluation")] = None,
    alpha: Annotated[float, typer.Option()] = 0.1,
    delta: Annotated[float, typer.Option()] = 0.1,
    splits: Annotated[int, typer.Option()] = 1000,
    signal: Annotated[str, typer.Option(help=f"{' | '.join(SIGNAL_NAMES)} (default: the bundle's)")] = "",
    json_out: Annotated[bool, typer.Option("--json", help="print JSON only")] = True,
) -> None:
    """Repeat calibration on random calibration/evaluation splits; report how often the budget is exceeded."""
    from probes.data import read_file
    from probes.evaluation.cascade import CascadeContext
    from probes.evaluation.policies import validate_guarantee as run

    s = settings(ctx)
    with progress_bars(options(ctx).progress and not json_out) as bars:
        cascade = CascadeContext(s, bundle, bars)
        records = ([r for path in data for r in read_file(path)] if data
                   else list(cascade.prepared.splits.calibration) + list(cascade.prepared.splits.evaluation))
        calibration = cascade.bundle.manifest.calibration
        chosen = signal or (calibration.signal if calibration is not None and calibration.signal else "dv")
        values = cascade.signal(chosen, cascade.score(records))
    result = run(values, alpha=alpha, delta=delta, splits=splits)
    emit({**result, "signal": chosen})


@guarded
def evaluate_stream(
    ctx: typer.Context,
    bundle: BundleOpt = Path("runs/bundle"),
    data: Annotated[list[Path] | None, typer.Option(
        "--data", help="response file(s); default: stream.files (with --leave-source-out: every labelled response "
        "source)")] = None,
    max_per_source: Annotated[int, typer.Option(
        help="seeded cap per source before the split (0: all); with --leave-source-out half of it per class")] = 400,
    leave_source_out: Annotated[bool, typer.Option(
        "--leave-source-out", help="hold out each response source in turn: fit the token head and certify its stop "
        "cuts on the others, stop the held-out one's responses (needs only the bundle's model)")] = False,
    read_tokens: Annotated[int | None, typer.Option(
        min=8, help="--leave-source-out: response tokens read per response (default stream.calibration_max_tokens)"
    )] = None,
    smoothing: Annotated[str | None, typer.Option(
        help="--leave-source-out: smoothed series compared on the same folds, e.g. 'ema:0.9,rolling_max:16,"
        "rolling_max:64' (default: stream.decay and stream.window)")] = None,
    out: Annotated[Path, typer.Option(
        help="output directory (stream.json, stream.md; loso.json, loso.md)")] = Path("runs/stream"),
) -> None:
    """Streamed stop rule on the evaluation split of the response files: EMA vs rolling-max vs full-text probes."""
    from probes.evaluation.stream_loso import Smoothing

    if not leave_source_out and (smoothing is not None or read_tokens is not None):
        fail("--smoothing and --read-tokens apply to --leave-source-out only")
    try:
        smoothings = Smoothing.parse(smoothing) if smoothing is not None else None
    except ValueError as exc:
        fail(f"--smoothing: {exc}")
    s = settings(ctx)
    out.mkdir(parents=True, exist_ok=True)
    with progress_bars(options(ctx).progress) as bars:
        if leave_source_out:
            from probes.evaluation.stream_loso import run_stream_loso

            report = run_stream_loso(s, bundle, data, max_per_source or None, read_tokens, smoothings, bars)
            name = "loso"
        else:
            from probes.evaluation.stream_eval import run_evaluate_stream

            report = run_evaluate_stream(s, bundle, data, max_per_source or None, bars)
            name = "stream"
    table = report.pop("markdown")
    (out / f"{name}.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    (out / f"{name}.md").write_text(table)
    console.print(table)
    emit(report)
