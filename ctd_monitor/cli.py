"""``ctd-monitor``: train probes and experts offline, run the streaming monitor, benchmark it."""

from __future__ import annotations

from typing import Annotated

import typer

from ctd_monitor.commands import bench, bench_quality, calibrate, evaluate, local, serve, train
from ctd_monitor.commands.common import ConfigOpt, Options

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.callback()
def main(
    ctx: typer.Context,
    config: ConfigOpt = None,
    progress: Annotated[bool, typer.Option(help="show progress bars on stderr")] = True,
) -> None:
    ctx.obj = Options(config=config, progress=progress)


# Registration order is the order of ``ctd-monitor --help``.
app.command()(train.extract)
app.command("train-probe")(train.train_probe)
app.command("train-expert")(train.train_expert)
app.command()(train.train)
app.command()(serve.run)
app.command("run-responses")(serve.run_responses)
app.command()(serve.expert)
app.command()(local.demo)
app.command()(local.replay)
app.command("train-dv")(train.train_dv)
app.command()(calibrate.calibrate)
app.command()(evaluate.evaluate)
app.command("validate-guarantee")(evaluate.validate_guarantee)
app.command("train-token-probe")(train.train_token_probe)
app.command("evaluate-stream")(evaluate.evaluate_stream)

topics_app = typer.Typer(no_args_is_help=True, help="The Kafka topics the monitor reads and writes.")
app.add_typer(topics_app, name="topics")
topics_app.command("create")(serve.topics_create)

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks; each prints JSON.")
app.add_typer(bench_app, name="bench")
bench_app.command("pipeline")(bench.bench_pipeline)
bench_app.command("machinery")(bench.bench_machinery)
bench_app.command("heads")(bench.bench_heads)
bench_app.command("generalization")(bench_quality.bench_generalization)
bench_app.command("cascade-cost")(bench.bench_cascade_cost)
bench_app.command("soak")(bench.bench_soak)
bench_app.command("drift")(bench_quality.bench_drift)
bench_app.command("adaptation")(bench_quality.bench_adaptation)
bench_app.command("long-conversations")(bench_quality.bench_long_conversations)
bench_app.command("stream")(bench.bench_stream)

app.command()(serve.schemas)
app.command()(serve.keys)
app.command()(local.broker)


if __name__ == "__main__":
    app()
