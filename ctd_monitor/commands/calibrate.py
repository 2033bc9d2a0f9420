"""``calibrate``: Learn-then-Test of a bundle's unsafe cuts and delegation threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ctd_monitor.commands.common import BundleOpt, emit, fail, guarded, options, settings
from ctd_monitor.progress import console, progress_bars
from probes.runtime.manifest import SIGNAL_NAMES, Signal


@guarded
def calibrate(
    ctx: typer.Context,
    bundle: BundleOpt = Path("runs/bundle"),
    alpha: Annotated[float, typer.Option(help="delegation budget (fraction of traffic)")] = 0.1,
    delta: Annotated[float, typer.Option(help="allowed failure probability of each guarantee")] = 0.1,
    epsilon: Annotated[float, typer.Option(help="benign flag rate the unsafe cuts are certified to stay under")] = 0.05,
    signal: Annotated[str, typer.Option(help=" | ".join(SIGNAL_NAMES))] = "dv",
    variant: Annotated[str, typer.Option(help="pareto | budget")] = "pareto",
    seed: Annotated[int, typer.Option(help="seed of the opt/HT split")] = 0,
) -> None:
    """Learn-then-Test on the calibration split: the unsafe cuts of probe and expert (benign flag rate ≤ ε), their
    cuts for long conversations (on long benign ones, read as the worker and the guard read them), then the delegation
    threshold (rate ≤ α) at those cuts; writes them to the manifest."""
    from probes.evaluation.cascade import (
        CascadeContext,
        calibrate_cuts,
        calibrate_long,
        calibrate_signal,
        write_calibration,
        write_cuts,
    )

    if signal not in SIGNAL_NAMES or variant not in ("pareto", "budget"):
        fail(f"--signal must be {'|'.join(SIGNAL_NAMES)} and --variant pareto|budget")
    if not 0 < epsilon < 1:
        fail("--epsilon must be in (0, 1)")
    s = settings(ctx)
    with progress_bars(options(ctx).progress) as bars:
        cascade = CascadeContext(s, bundle, bars)
        cal = cascade.split("calibration")
        probe_cut, expert_cut = calibrate_cuts(cascade, cal, epsilon=epsilon, delta=delta)
        long_cuts = calibrate_long(cascade, epsilon=epsilon, delta=delta)
        write_cuts(cascade, probe_cut, expert_cut, long_cuts)
        result = calibrate_signal(cascade, cal, Signal(signal), alpha=alpha, delta=delta,
                                  variant=variant, seed=seed)  # type: ignore[arg-type]
    write_calibration(cascade, result)
    for cut in (probe_cut, expert_cut):
        if not cut.valid:
            console.print(f"[bold yellow]warning:[/] no {cut.scorer} unsafe cut certified at ε={epsilon}, δ={delta} "
                          f"on {cut.n} benign items: the default cut {cut.cut} stays, its flag rate is not bounded")
    for long_cut in long_cuts:
        if long_cut is not None and not long_cut.cut.valid:
            console.print(f"[bold yellow]warning:[/] no {long_cut.cut.scorer} unsafe cut certified for long "
                          f"conversations at ε={epsilon} on {long_cut.cut.n} long benign conversations: they share "
                          "its cut for the rest, unbounded on them")
    if not result.valid:
        console.print("[bold yellow]warning:[/] no valid threshold: the monitor will never delegate")
    dv = cascade.bundle.manifest.heads.get("dv")
    trained_at = dv.decision_cuts.get("probe") if dv is not None else None
    if signal == "dv" and trained_at is not None and trained_at != probe_cut.cut:
        console.print(f"[bold yellow]warning:[/] the DV head learned where the expert fixes decisions at probe cut "
                      f"{trained_at:.6g}, the cascade now decides at {probe_cut.cut:.6g}: run `ctd-monitor train-dv` "
                      "again (it takes the calibrated cuts) and then calibrate")
    emit({**result.model_dump(mode="json"), "unsafe_cut": probe_cut.model_dump(mode="json"),
          "expert_unsafe_cut": expert_cut.model_dump(mode="json"),
          **{name: None if cut is None else cut.model_dump(mode="json")
             for name, cut in (("long_unsafe_cut", long_cuts.probe), ("expert_long_unsafe_cut", long_cuts.expert))}})
