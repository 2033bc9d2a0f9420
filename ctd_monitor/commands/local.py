"""The whole system on one machine: ``demo``, ``replay`` of dataset conversations, a local ``broker``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ctd_monitor.commands.common import emit, fail, guarded, options, settings
from ctd_monitor.progress import console, progress_bars


@guarded
def demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="where the bundle, summary.json, summary.png and demo.log go")] = Path(
        "runs/demo"),
    events: Annotated[int, typer.Option(min=10, help="labelled conversations to replay")] = 300,
    alpha: Annotated[float, typer.Option(
        help="delegation budget: the share of events the expert may see (LTT-certified, with probability ≥ 1 − δ)")] = 0.3,
    delta: Annotated[float, typer.Option(help="allowed failure probability of the budget guarantee")] = 0.1,
    per_source: Annotated[int, typer.Option(min=5, help="training rows per source (small: minutes on a CPU)")] = 40,
    epsilon: Annotated[float, typer.Option(
        min=0.001, max=0.5, help="benign flag rate the unsafe cuts of probe and expert are each certified at "
        "(the cascade takes each decision from one of them: at most 2ε on traffic like the calibration's)")] = 0.08,
) -> None:
    """The whole system on this machine: train or reuse a bundle, run broker + worker + guard + alerter, replay."""
    from ctd_monitor.local.demo import DemoOptions, run_demo
    from probes.logs import configure_logging

    s = settings(ctx)
    out.mkdir(parents=True, exist_ok=True)
    configure_logging(s.log_level, path=out / "demo.log")  # the terminal shows progress; JSON logs go here
    demo_options = DemoOptions(out=out, events=events, alpha=alpha, delta=delta, per_source=per_source,
                               epsilon=epsilon)
    with progress_bars(options(ctx).progress) as bars:
        summary = run_demo(s, demo_options, bars)
    emit(summary)
    console.print(f"[bold green]demo done[/]: {out / 'summary.json'}, {out / 'summary.png'}, logs in {out / 'demo.log'}")


@guarded
def replay(
    ctx: typer.Context,
    data: Annotated[list[Path], typer.Option("--data", help="dataset file(s) to replay")],
    rate: Annotated[float | None, typer.Option(help="events per second (default: as fast as possible)")] = None,
    limit: Annotated[int | None, typer.Option(help="replay at most N conversations")] = None,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers")] = None,
) -> None:
    """Produce dataset conversations as events (labels in metadata) to the input topic."""
    import asyncio

    from ctd_monitor.local.replay import replay as do_replay
    from worker.config import WorkerSettings
    from worker.main import override
    from worker.topics import require_topics

    s = override(settings(ctx, cls=WorkerSettings), section="worker", bootstrap=bootstrap)
    # Without the topic the producer would wait for metadata, then die with a raw UnknownTopicOrPartitionError.
    asyncio.run(require_topics(s.kafka, [s.topics.input]))
    with progress_bars(options(ctx).progress) as bars:
        result = asyncio.run(do_replay(s, data, rate=rate, limit=limit, progress=bars("replay", limit or 0)))
    emit(result)


def broker(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(help="port on 127.0.0.1 (default: a free one)")] = None,
    fetch_only: Annotated[bool, typer.Option("--fetch-only", help="only fetch the Kafka jars")] = False,
) -> None:
    """Run a local single-node Kafka (KRaft) broker from cached Maven Central jars."""
    from ctd_monitor.local.broker import run_broker_forever
    from probes.errors import CtdError

    s = settings(ctx)
    try:
        code = run_broker_forever(s.cache_dir, port, fetch_only)
    except CtdError as exc:
        fail(str(exc))
    raise typer.Exit(code)
