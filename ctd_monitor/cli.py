"""``ctd-monitor``: train probes and experts offline, run the streaming monitor, benchmark it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer

from ctd_monitor.progress import console, progress_bars
from probes.config import Settings, load_settings
from probes.errors import CtdError
from probes.logs import configure_logging
from probes.runtime.manifest import SIGNAL_NAMES, Signal

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML/TOML config file (env CTD_* wins)")]
DataOpt = Annotated[
    list[Path] | None, typer.Option("--data", help="dataset file(s); default: the configured training mix")
]


@dataclass(frozen=True)
class Options:
    """The global options, carried in typer's context object."""

    config: Path | None = None
    progress: bool = True


def options(ctx: typer.Context) -> Options:
    return ctx.obj if isinstance(ctx.obj, Options) else Options()


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def settings(ctx: typer.Context, *, cls: type[Settings] = Settings, **overrides: Any) -> Any:
    try:
        loaded = load_settings(options(ctx).config, cls=cls, **overrides)
    except CtdError as exc:
        fail(str(exc))
    configure_logging(loaded.log_level)
    return loaded


def emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")


@app.callback()
def main(
    ctx: typer.Context,
    config: ConfigOpt = None,
    progress: Annotated[bool, typer.Option(help="show progress bars on stderr")] = True,
) -> None:
    ctx.obj = Options(config=config, progress=progress)


def _guarded(fn: Any) -> Any:
    """Turn the project's own errors into a clear one-line message and exit code 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CtdError as exc:
            fail(str(exc))

    return wrapper


@app.command()
@_guarded
def extract(ctx: typer.Context, data: DataOpt = None) -> None:
    """Extract pooled activations for the dataset mix (cached on disk; reruns are instant)."""
    from probes.fitting import pipeline

    s = settings(ctx)
    prepared = pipeline.prepare_data(s, data)
    loaded = pipeline.load_monitored_model(s)
    with progress_bars(options(ctx).progress) as bars:
        features, cached = pipeline.extract_features(
            s, pipeline.make_extractor(s, loaded), list(prepared.dataset.records),
            prepared.dataset.content_hash(), bars,
        )
    emit({"n": int(features.shape[0]), "dim": int(features.shape[1]), "cached": cached,
          "layer": s.features.layer, "pooling": s.features.pooling, "model": loaded.model_id})


@app.command("train-probe")
@_guarded
def train_probe(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="bundle directory to write")] = Path("runs/bundle"),
    data: DataOpt = None,
) -> None:
    """Train the safety probe on probe-train and write a probe bundle; print evaluation metrics."""
    from probes.fitting import pipeline

    s = settings(ctx)
    with progress_bars(options(ctx).progress) as bars:
        result = pipeline.train_probe(s, out, bars, prepared=pipeline.prepare_data(s, data))
    emit({"bundle": str(result.bundle_dir), "features_cached": result.features_cached, **result.metrics})


@app.command("train-expert")
@_guarded
def train_expert(
    ctx: typer.Context,
    data: DataOpt = None,
    force: Annotated[bool, typer.Option(help="retrain even if a cached expert matches")] = False,
) -> None:
    """Fine-tune the encoder-head expert (cached outside the repo); print its evaluation metrics."""
    from probes.fitting import pipeline

    s = settings(ctx)
    with progress_bars(options(ctx).progress) as bars:
        result = pipeline.train_expert(s, bars, prepared=pipeline.prepare_data(s, data), force=force)
    emit({"expert": str(result.expert_dir), "name": result.name, "evaluation": result.metrics})


@app.command()
@_guarded
def train(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="bundle directory to write")] = Path("runs/bundle"),
    data: DataOpt = None,
) -> None:
    """Train probe and expert on the shared data; print probe-only vs expert-only on the evaluation split."""
    from probes.fitting import pipeline

    s = settings(ctx)
    with progress_bars(options(ctx).progress) as bars:
        probe, expert, manifest = pipeline.train_bundle(s, out, bars, pipeline.prepare_data(s, data))
    emit({"bundle": str(out), "split_sizes": manifest.data.split_sizes,
          "probe_only": probe.metrics["evaluation"], "expert_only": expert.metrics, "expert": expert.name})


@app.command()
@_guarded
def run(
    ctx: typer.Context,
    bundle: Annotated[Path | None, typer.Option(help="probe bundle (default: worker.bundle)")] = None,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers")] = None,
) -> None:
    """Run the streaming monitor worker until SIGTERM/SIGINT (drains, commits and leaves the group)."""
    from worker.config import WorkerSettings
    from worker.main import override, run_worker

    run_worker(override(settings(ctx, cls=WorkerSettings), section="worker", bundle=bundle, bootstrap=bootstrap))


@app.command("run-responses")
@_guarded
def run_responses(
    ctx: typer.Context,
    bundle: Annotated[Path | None, typer.Option(help="bundle with a token probe (default: responses.bundle)")] = None,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers")] = None,
) -> None:
    """Score streamed responses (topic ``responses``) chunk by chunk; stop verdicts until SIGTERM/SIGINT."""
    from worker.config import WorkerSettings
    from worker.main import override
    from worker.main import run_responses as serve

    serve(override(settings(ctx, cls=WorkerSettings), section="responses", bundle=bundle, bootstrap=bootstrap))


@app.command()
@_guarded
def expert(
    ctx: typer.Context,
    bundle: Annotated[Path | None, typer.Option(help="take the encoder-head expert recorded in this bundle")] = None,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers")] = None,
) -> None:
    """Run the guard service (expert verdicts for delegated events) and the alerter until SIGTERM/SIGINT."""
    from worker.config import GuardSettings
    from worker.main import override, run_guard

    run_guard(override(settings(ctx, cls=GuardSettings), section="guard", bundle=bundle, bootstrap=bootstrap))


@app.command()
@_guarded
def demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="where the bundle, summary.json, summary.png and demo.log go")] = Path(
        "runs/demo"),
    events: Annotated[int, typer.Option(min=10, help="labelled conversations to replay")] = 300,
    alpha: Annotated[float, typer.Option(help="delegation budget")] = 0.2,
    delta: Annotated[float, typer.Option(help="allowed failure probability of the budget guarantee")] = 0.1,
    per_source: Annotated[int, typer.Option(min=5, help="training rows per source (small: minutes on a CPU)")] = 40,
) -> None:
    """The whole system on this machine: train or reuse a bundle, run broker + worker + guard + alerter, replay."""
    from ctd_monitor.local.demo import DemoOptions, run_demo
    from probes.logs import configure_logging

    s = settings(ctx)
    out.mkdir(parents=True, exist_ok=True)
    configure_logging(s.log_level, path=out / "demo.log")  # the terminal shows progress; JSON logs go here
    demo_options = DemoOptions(out=out, events=events, alpha=alpha, delta=delta, per_source=per_source)
    with progress_bars(options(ctx).progress) as bars:
        summary = run_demo(s, demo_options, bars)
    emit(summary)
    console.print(f"[bold green]demo done[/]: {out / 'summary.json'}, {out / 'summary.png'}, logs in {out / 'demo.log'}")


@app.command()
@_guarded
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


BundleOpt = Annotated[Path, typer.Option("--bundle", help="probe bundle directory")]


@app.command("train-dv")
@_guarded
def train_dv(
    ctx: typer.Context,
    bundle: BundleOpt = Path("runs/bundle"),
    target: Annotated[str, typer.Option(help="binary | continuous")] = "binary",
    source: Annotated[str, typer.Option(help="crossfit (probe-train + dev, out-of-fold probe) | dev")] = "crossfit",
) -> None:
    """Train the delegation-value head and the SafeRoute-style router; store them in the bundle."""
    from probes.evaluation.cascade import CascadeContext
    from probes.evaluation.cascade import train_dv as run

    if target not in ("binary", "continuous") or source not in ("crossfit", "dev"):
        fail("--target must be binary or continuous, --source crossfit or dev")
    s = settings(ctx)
    with progress_bars(options(ctx).progress) as bars:
        result = run(CascadeContext(s, bundle, bars), target=target, source=source)  # type: ignore[arg-type]
    emit({"bundle": str(bundle), **result})


@app.command()
@_guarded
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
    """Learn-then-Test on the calibration split: the unsafe cuts of probe and expert (benign flag rate ≤ ε), then
    the delegation threshold (rate ≤ α) at those cuts; writes both to the manifest."""
    from probes.evaluation.cascade import (
        CascadeContext,
        calibrate_cuts,
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
        write_cuts(cascade, probe_cut, expert_cut)
        result = calibrate_signal(cascade, cal, Signal(signal), alpha=alpha, delta=delta,
                                  variant=variant, seed=seed)  # type: ignore[arg-type]
    write_calibration(cascade, result)
    for cut in (probe_cut, expert_cut):
        if not cut.valid:
            console.print(f"[bold yellow]warning:[/] no {cut.scorer} unsafe cut certified at ε={epsilon}, δ={delta} "
                          f"on {cut.n} benign items: the default cut {cut.cut} stays, its flag rate is not bounded")
    if not result.valid:
        console.print("[bold yellow]warning:[/] no valid threshold: the monitor will never delegate")
    emit({**result.model_dump(mode="json"), "unsafe_cut": probe_cut.model_dump(mode="json"),
          "expert_unsafe_cut": expert_cut.model_dump(mode="json")})


@app.command()
@_guarded
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


@app.command("validate-guarantee")
@_guarded
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


@app.command("train-token-probe")
@_guarded
def train_token_probe(
    ctx: typer.Context,
    bundle: BundleOpt = Path("runs/bundle"),
    data: Annotated[list[Path] | None, typer.Option("--data", help="response file(s); default: stream.files")] = None,
) -> None:
    """Token-level probe on the response datasets + its LTT stop thresholds, stored in the bundle."""
    from probes.fitting.token_train import train_token_probe as run

    s = settings(ctx)
    with progress_bars(options(ctx).progress) as bars:
        emit(run(s, bundle, bars, data))


@app.command("evaluate-stream")
@_guarded
def evaluate_stream(
    ctx: typer.Context,
    bundle: BundleOpt = Path("runs/bundle"),
    data: Annotated[list[Path] | None, typer.Option("--data", help="response file(s); default: stream.files")] = None,
    max_per_source: Annotated[int, typer.Option(help="seeded cap per source before the split (0: all)")] = 400,
    out: Annotated[Path, typer.Option(help="output directory (stream.json, stream.md)")] = Path("runs/stream"),
) -> None:
    """Streamed stop rule on the evaluation split of the response files: EMA vs rolling-max vs full-text probes."""
    from probes.evaluation.stream_eval import run_evaluate_stream

    s = settings(ctx)
    out.mkdir(parents=True, exist_ok=True)
    with progress_bars(options(ctx).progress) as bars:
        report = run_evaluate_stream(s, bundle, data, max_per_source or None, bars)
    table = report.pop("markdown")
    (out / "stream.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    (out / "stream.md").write_text(table)
    console.print(table)
    emit(report)


topics_app = typer.Typer(no_args_is_help=True, help="The Kafka topics the monitor reads and writes.")
app.add_typer(topics_app, name="topics")


@topics_app.command("create")
@_guarded
def topics_create(
    ctx: typer.Context,
    partitions: Annotated[int, typer.Option(min=1, help="input partitions (the most workers that share the load)")] = 3,
    output_partitions: Annotated[int, typer.Option(min=1, help="verdict and review partitions")] = 3,
    replication_factor: Annotated[int, typer.Option(min=1, help="replicas per partition")] = 1,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers")] = None,
    tenant: Annotated[list[str] | None, typer.Option(
        "--tenant", help="also create <topics.input>.<tenant> (tenant.source: topic); repeatable")] = None,
) -> None:
    """Create the topics with their configs (max.message.bytes from worker.max_event_bytes); idempotent."""
    import asyncio

    from worker.config import WorkerSettings
    from worker.main import override
    from worker.topics import create_topics, topic_specs

    s = override(settings(ctx, cls=WorkerSettings), section="worker", bootstrap=bootstrap)
    kafka = s.kafka
    specs = topic_specs(s.topics, s.worker, input_partitions=partitions, output_partitions=output_partitions,
                        replication_factor=replication_factor, tenants=tenant or ())
    outcomes = asyncio.run(create_topics(kafka, specs))
    emit({"bootstrap": kafka.bootstrap_servers, "topics": [o.model_dump() for o in outcomes]})


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks; each prints JSON.")
app.add_typer(bench_app, name="bench")


BenchBundleOpt = Annotated[Path | None, typer.Option("--bundle", help="probe bundle (default: worker.bundle)")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N (default: model.device)")]
DtypeOpt = Annotated[str | None, typer.Option(help="auto | bf16 | fp16 | fp32 (default: model.dtype)")]
BenchDataOpt = Annotated[list[Path] | None, typer.Option("--data", help="texts to push through")]


def _bench_settings(ctx: typer.Context, bundle: Path | None, device: str | None, dtype: str | None) -> Any:
    from worker.config import WorkerSettings
    from worker.main import override

    s: WorkerSettings = override(settings(ctx, cls=WorkerSettings), section="worker", bundle=bundle)
    model = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    return s.model_copy(update={"model": s.model.model_copy(update=model)}) if model else s


def _bench_files(s: Any, data: list[Path] | None) -> list[Path]:
    return data or [s.data.datasets_dir / "harmbench.jsonl", s.data.datasets_dir / "xstest.jsonl"]


@bench_app.command("pipeline")
@_guarded
def bench_pipeline(
    ctx: typer.Context,
    data: BenchDataOpt = None,
    n: Annotated[int, typer.Option(help="number of events")] = 300,
    bundle: BenchBundleOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    mode: Annotated[str, typer.Option(help="process: the worker in a child process, as deployed | inline")] = "process",
) -> None:
    """Raw forward-pass rate vs end-to-end worker rate through a real local broker, same texts, one run."""
    from ctd_monitor.bench.pipeline import bench_pipeline as run_bench

    if mode not in ("process", "inline"):
        fail("--mode must be process or inline")
    s = _bench_settings(ctx, bundle, device, dtype)
    emit(run_bench(s, _bench_files(s, data), n, mode=mode))


@bench_app.command("machinery")
@_guarded
def bench_machinery(
    ctx: typer.Context,
    data: BenchDataOpt = None,
    n: Annotated[int, typer.Option(help="events per partition count")] = 10000,
    partitions: Annotated[str, typer.Option(help="input partition counts to run, comma-separated")] = "1,2,4",
    bundle: BenchBundleOpt = None,
    profile_dir: Annotated[Path | None, typer.Option(help="cProfile the worker's event loop into DIR")] = None,
) -> None:
    """Host-side ceiling of one worker process: the real path through a real broker, forward pass stubbed."""
    from ctd_monitor.bench.machinery import bench_machinery as run_bench

    s = _bench_settings(ctx, bundle, "cpu", None)
    counts = [int(p) for p in partitions.split(",") if p.strip()]
    if not counts or min(counts) < 1:
        fail("--partitions must list positive integers, e.g. 1,2,4")
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    emit(run_bench(s, _bench_files(s, data), n, counts, profile_dir=profile_dir))


@bench_app.command("heads")
@_guarded
def bench_heads(
    ctx: typer.Context,
    data: BenchDataOpt = None,
    n: Annotated[int, typer.Option(help="number of conversations")] = 300,
    repeats: Annotated[int, typer.Option(help="passes over the batches")] = 3,
    bundle: BenchBundleOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Probe + DV head scoring time versus activation extraction, per batch (overhead_ratio)."""
    from ctd_monitor.bench.heads import bench_heads as run_bench

    s = _bench_settings(ctx, bundle, device, dtype)
    emit(run_bench(s, _bench_files(s, data), n, repeats=repeats))


@bench_app.command("generalization")
@_guarded
def bench_generalization(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="directory for metrics.json and report.md")] = Path("runs/generalization"),
    recipes: Annotated[str, typer.Option(help="comma-separated recipes: before (today's), after (issue 12's), "
                                         "broad (issue 21's, for --groups broad)")] = "before,after",
    groups: Annotated[str | None, typer.Option(help="default | broad (the default groups and one per contrastive "
                                               "source family); default: the pool config's")] = None,
    expert: Annotated[str, typer.Option(help="frozen (sentence-encoder embeddings + head per fold) | finetune "
                                        "(the encoder-head expert fine-tuned per fold; slow)")] = "frozen",
    expert_spec: Annotated[str, typer.Option(help="expert backbone model spec")] = "all-mpnet-base-v2",
    per_file: Annotated[int | None, typer.Option(help="records sampled per file (default: the pool config's)")] = None,
    budgets: Annotated[str, typer.Option(help="comma-separated delegation budgets α")] = "0.05,0.1,0.2,0.3",
    delta: Annotated[float, typer.Option(help="δ of every certified threshold")] = 0.1,
    sweep: Annotated[str, typer.Option(help="probe feature combinations to compare, ';'-separated, each "
                                       "'LAYER:POOLING[+LAYER:POOLING...]', e.g. '15:mean;15:max;12:mean+15:mean'")] = "",
    loso_config: Annotated[Path | None, typer.Option(help="YAML/JSON LosoConfig (groups, pool, recipes)")] = None,
    adapt_audits: Annotated[int | None, typer.Option(
        min=0, help="also let N audits of each held-out group teach the probe (Platt or head refit, oracle or "
        "expert guard), figures on the group's other half; 0: off")] = None,
    adapt_epsilon: Annotated[float | None, typer.Option(
        help="ε of the adapted cut's certificate (default: the recipe's)")] = None,
    adapt_guard: Annotated[bool, typer.Option(
        "--adapt-guard", help="also label the audits with the configured expert backend (expert.*: e.g. a Llama "
        "Guard through hf-guard or a vLLM server through openai-compatible), beside the oracle and the fold's "
        "expert")] = False,
    dilution_bundle: Annotated[Path | None, typer.Option(
        help="also run the dilution yardstick on this bundle: held-out harmful requests padded with benign filler "
        "(before, after, around, in a window gap) or disguised (zero-width, homoglyphs, fullwidth, bidi), scored "
        "as the worker scores; --recipes '' runs it alone")] = None,
    dilution_requests: Annotated[int, typer.Option(min=1, help="held-out harmful requests of the yardstick")] = 40,
    dilution_lengths: Annotated[str, typer.Option(help="comma-separated filler lengths, in the bundle model's "
                                                  "tokens")] = "256,1024,3072",
) -> None:
    """Leave-source-out: per held-out group of sources, train probe, expert, DV and cuts on the others."""
    import yaml

    from probes.evaluation import generalization as g

    s = settings(ctx)
    try:
        base = g.LosoConfig(**(yaml.safe_load(loso_config.read_text()) or {})) if loso_config else g.LosoConfig()
        alphas = tuple(float(x) for x in budgets.split(",") if x.strip())
        # The built-in recipes read the configured probe features (layer 15 mean by default).
        configured = ((s.features.layer, s.features.pooling),)
        known = {r.name: r.model_copy(update={"variants": configured}) for r in (g.BEFORE, g.AFTER, g.BROAD)}
        known.update({r.name: r for r in base.recipes})
        chosen = tuple(known[name.strip()] for name in recipes.split(",") if name.strip())
        combos = [tuple((int(v.split(":")[0]), v.split(":")[1]) for v in combo.split("+"))
                  for combo in sweep.split(";") if combo.strip()]
        lengths = tuple(int(x) for x in dilution_lengths.split(",") if x.strip())
    except (ValueError, KeyError, IndexError, OSError) as exc:
        fail(f"bad option: {exc}")
    if not chosen and dilution_bundle is None:
        fail("no recipe and no --dilution-bundle: nothing to measure")
    if expert not in ("frozen", "finetune"):
        fail("--expert must be frozen or finetune")
    if groups not in (None, "default", "broad"):
        fail("--groups must be default or broad")
    pool = base.pool if per_file is None else base.pool.model_copy(update={"per_file": per_file})
    if groups is not None:
        pool = pool.model_copy(update={"groups": g.BROAD_GROUPS if groups == "broad" else g.DEFAULT_GROUPS})
    config = base.model_copy(update={
        "pool": pool, "recipes": chosen, "alphas": alphas, "delta": delta, "probe_spec": s.model.spec,
        "probe_max_tokens": s.model.max_tokens, "dtype": s.model.dtype,
        "expert": base.expert.model_copy(update={"kind": expert, "spec": expert_spec}),
        **({} if adapt_audits is None else {"adapt_audits": adapt_audits}),
        **({} if adapt_epsilon is None else {"adapt_epsilon": adapt_epsilon})})
    guard = None
    if adapt_guard:
        if not config.adapt_audits:
            fail("--adapt-guard needs --adapt-audits N")
        from probes.experts.factory import build_expert

        guard = build_expert(s)
    out.mkdir(parents=True, exist_ok=True)
    with progress_bars(options(ctx).progress) as bars:
        report: dict[str, Any] = {"config": config.model_dump(mode="json"), "expert": None, "computed": {},
                                  "recipes": {}}
        if chosen:
            report = g.run_loso(config, cache_dir=s.cache_dir, datasets_dir=s.data.datasets_dir, progress=bars,
                                sweep=combos, guard=None if guard is None else guard.score,
                                guard_name=None if guard is None else guard.name)
        if dilution_bundle is not None:
            from probes.evaluation.dilution import DISGUISES, PLACEMENTS, run_dilution

            report["dilution"] = run_dilution(
                dilution_bundle, s.model, cache_dir=s.cache_dir, datasets_dir=s.data.datasets_dir,
                n=dilution_requests, lengths=lengths,
                progress=bars("dilution yardstick (requests x transformations)", dilution_requests * (
                    1 + (len(PLACEMENTS) + 1) * len(lengths) + len(DISGUISES))))
    (out / "metrics.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    g.write_report(report, out)
    emit({"out": str(out), "expert": report["expert"], "computed": report["computed"],
          "means": {name: r["mean"] for name, r in report["recipes"].items()},
          **({"dilution": {name: r["held"] for name, r in report["dilution"]["transformations"].items()}}
             if "dilution" in report else {})})


@bench_app.command("cascade-cost")
@_guarded
def bench_cascade_cost(
    ctx: typer.Context,
    data: Annotated[list[Path] | None, typer.Option("--data", help="labelled file(s); default: the bundle's "
                                                    "evaluation split")] = None,
    n: Annotated[int, typer.Option(help="at most N conversations")] = 500,
    bundle: BenchBundleOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    expert_backend: Annotated[str | None, typer.Option(help="encoder-head | hf-guard | openai-compatible "
                                                       "(default: expert.backend)")] = None,
    expert_path: Annotated[Path | None, typer.Option(help="trained encoder-head expert directory "
                                                     "(default: the bundle's)")] = None,
) -> None:
    """Compute per 1k events (seconds, parameters x tokens) and accuracy: expert-only vs the calibrated cascade."""
    from ctd_monitor.bench.cost import bench_cascade_cost as run_bench

    s = _bench_settings(ctx, bundle, device, dtype)
    expert: dict[str, Any] = {}
    if expert_backend is not None:
        if expert_backend not in ("encoder-head", "hf-guard", "openai-compatible"):
            fail("--expert-backend must be encoder-head, hf-guard or openai-compatible")
        expert["backend"] = expert_backend
    if expert_path is not None:
        expert["path"] = expert_path
    if expert:
        s = s.model_copy(update={"expert": s.expert.model_copy(update=expert)})
    emit(run_bench(s, data, n))


@bench_app.command("soak")
@_guarded
def bench_soak(
    ctx: typer.Context,
    data: BenchDataOpt = None,
    n: Annotated[int, typer.Option(help="number of events (the data is cycled)")] = 3000,
    rate: Annotated[float, typer.Option(help="events per second")] = 20.0,
    interval: Annotated[float, typer.Option(help="seconds between RSS / latency samples")] = 10.0,
    bundle: BenchBundleOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """N events at a fixed rate through the worker process and a local broker: RSS growth and latency over time."""
    from ctd_monitor.bench.soak import bench_soak as run_bench

    if rate <= 0 or interval <= 0 or n < 1:
        fail("--rate and --interval must be positive and --n at least 1")
    s = _bench_settings(ctx, bundle, device, dtype)
    emit(run_bench(s, _bench_files(s, data), n, rate, interval))


@bench_app.command("drift")
@_guarded
def bench_drift(
    ctx: typer.Context,
    bundle: Annotated[Path, typer.Option(help="probe bundle with a calibrated threshold")] = Path("runs/bundle"),
    out: Annotated[Path, typer.Option(help="directory for drift.png and drift.json")] = Path("runs/drift"),
    phase: Annotated[list[str] | None, typer.Option(
        "--phase", help="NAME=FILE[+FILE...]:EVENTS in stream order (files relative to the datasets dir); "
        "default: the bundle's training mix → jailbreak prompts → unseen tweets → training mix")] = None,
    events: Annotated[int, typer.Option(help="events per default phase")] = 4000,
    pool: Annotated[int, typer.Option(help="records scored per source file (events are drawn from them)")] = 200,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Realised delegation rate under a shifting mix: offline threshold vs windowed control vs hard cap.

    The window, re-certification and cap settings come from the ``budget`` config section (CTD_BUDGET__*).
    """
    from ctd_monitor.bench.drift import default_phases, drift_stream, parse_phase, report
    from probes.runtime.monitor import Monitor
    from worker.budget import BudgetController
    from worker.config import WorkerSettings

    s: WorkerSettings = settings(ctx, cls=WorkerSettings)
    monitor = Monitor(bundle, s.model, cache_dir=s.cache_dir)
    data_dir = s.data.datasets_dir
    if phase:
        phases = [parse_phase(p, data_dir) for p in phase]
    else:
        trained_on = list(monitor.bundle.manifest.data.file_sha256 or s.data.files)
        phases = default_phases(trained_on, data_dir, events)
    if not monitor.rule.valid:
        fail("the bundle has no valid delegation threshold: there is no budget to control")
    BudgetController(monitor.rule, s.budget.model_copy(update={"hard_cap": True}))  # a bad cap fails before scoring
    signals, pools = drift_stream(monitor, phases, pool=pool, seed=seed)
    emit(report(signals, pools, phases, monitor.rule, s.budget, out))


@bench_app.command("adaptation")
@_guarded
def bench_adaptation(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="directory for adaptation.json (and adaptation.png)")] = Path(
        "runs/adaptation"),
    held_out: Annotated[str, typer.Option(help="comma-separated source groups streamed after the training mix, "
                                          "in order; trained on the other groups")] = "tweets,dialogues,xstest",
    events: Annotated[int, typer.Option(help="events per phase (drawn with replacement from its records)")] = 4000,
    per_file: Annotated[int | None, typer.Option(help="records sampled per file (default: the pool config's)")] = None,
    expert_spec: Annotated[str, typer.Option(help="frozen expert backbone (the guard of the replay)")] = (
        "all-mpnet-base-v2"),
    audit_rate: Annotated[float | None, typer.Option(help="share of events audited (default: audit.rate)")] = None,
    window: Annotated[int | None, typer.Option(help="audit window (default: audit.window)")] = None,
    min_window: Annotated[int | None, typer.Option(help="audits before the window's cut applies")] = None,
    refit_every: Annotated[int | None, typer.Option(help="refit after every k-th audit")] = None,
    refit: Annotated[str | None, typer.Option(help="what the window refits: platt (map + cut) | head (the probe's "
                                              "head + cut) (default: audit.refit)")] = None,
    epsilon: Annotated[float | None, typer.Option(help="certified benign flag rate (default: audit.epsilon)")] = None,
    loso_config: Annotated[Path | None, typer.Option(help="YAML/JSON LosoConfig (groups, pool)")] = None,
    guard_cut: Annotated[float, typer.Option(help="expert verdict cut on its recentred score (0.5: its certified "
                                             "cut; lower: a higher-recall guard)")] = 0.5,
    plot: Annotated[bool, typer.Option(help="also write adaptation.png")] = False,
) -> None:
    """Offline cut vs online recalibration from audited expert verdicts, on source groups the probe never saw.

    The audit settings come from the ``audit`` config section (CTD_AUDIT__*); the options override them.
    """
    import yaml

    from ctd_monitor.bench.adaptation import run_adaptation, write
    from probes.config import AuditConfig
    from probes.evaluation import generalization as g

    s = settings(ctx)
    try:
        base = g.LosoConfig(**(yaml.safe_load(loso_config.read_text()) or {})) if loso_config else g.LosoConfig()
        overrides = {k: v for k, v in (("rate", audit_rate), ("window", window), ("min_window", min_window),
                                       ("refit_every", refit_every), ("refit", refit), ("epsilon", epsilon))
                     if v is not None}
        audit = AuditConfig(**{**s.audit.model_dump(), **overrides})
    except (ValueError, OSError) as exc:
        fail(f"bad option: {exc}")
    if events < 1 or not 0 < guard_cut < 1:
        fail("--events must be at least 1 and --guard-cut in (0, 1)")
    pool = base.pool if per_file is None else base.pool.model_copy(update={"per_file": per_file})
    config = base.model_copy(update={
        "pool": pool, "probe_spec": s.model.spec, "probe_max_tokens": s.model.max_tokens, "dtype": s.model.dtype,
        "expert": base.expert.model_copy(update={"spec": expert_spec})})
    recipe = g.AFTER.model_copy(update={"variants": ((s.features.layer, s.features.pooling),)})
    groups = tuple(h.strip() for h in held_out.split(",") if h.strip())
    with progress_bars(options(ctx).progress) as bars:
        try:
            report = run_adaptation(config, held_out=groups, audit=audit, events=events, cache_dir=s.cache_dir,
                                    datasets_dir=s.data.datasets_dir, recipe=recipe, guard_cut=guard_cut,
                                    progress=bars)
        except ValueError as exc:
            fail(str(exc))
    emit(write(report, out, plot=plot))


@bench_app.command("stream")
@_guarded
def bench_stream(
    ctx: typer.Context,
    bundle: Annotated[Path, typer.Option(help="bundle with a token probe")] = Path("runs/bundle"),
    data: BenchDataOpt = None,
    n: Annotated[int, typer.Option(help="responses (evaluation split of the response files)")] = 40,
    chunks: Annotated[int, typer.Option(help="chunks per response")] = 8,
    batch: Annotated[int, typer.Option(min=1, help="responses streamed side by side, batched alike on both sides: "
                                       "their chunks in one incremental pass, their prefixes in one recompute pass")] = 1,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Tokens/s of incremental scoring (KV cache) vs recomputing the prefix per chunk; memory per open response."""
    from ctd_monitor.bench.stream import bench_stream as run_bench

    s = settings(ctx)
    model = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    if model:
        s = s.model_copy(update={"model": s.model.model_copy(update=model)})
    emit(run_bench(s, bundle, data, n, chunks, batch))


@app.command()
def schemas(
    ctx: typer.Context,
    write: Annotated[bool, typer.Option("--write", help="rewrite worker/schemas/*.json")] = False,
) -> None:
    """Print (or write) the JSON Schemas of the event, verdict, review-request and dead-letter records."""
    from worker.events import json_schemas

    generated = json_schemas()
    if write:
        target = Path(__file__).resolve().parent.parent / "worker" / "schemas"
        target.mkdir(exist_ok=True)
        for name, content in generated.items():
            (target / name).write_bytes(content)
    emit({name: orjson.loads(content) for name, content in generated.items()})


@app.command()
def keys(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="directory to write into (mount it as signing.keys_dir)")],
    role: Annotated[list[str] | None, typer.Option(help="worker | guard (repeat; default: both)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace existing keys (rotation: keep the "
                                            "old <role>.pub as <role>.<name>.pub first)")] = False,
) -> None:
    """Write an Ed25519 key pair per role (<role>.key, mode 0600; <role>.pub) and the audit secret (audit.secret)."""
    from worker.signing import ROLES, generate_audit_secret, generate_keys

    roles = role or list(ROLES)
    if unknown := [r for r in roles if r not in ROLES]:
        fail(f"--role must be one of {', '.join(ROLES)}, not {', '.join(unknown)}")
    ids = generate_keys(out, [r for r in ROLES if r in roles], overwrite=overwrite)
    secret = generate_audit_secret(out, overwrite=overwrite)
    emit({"keys_dir": str(out), "key_ids": ids, "audit_secret": str(secret)})


@app.command()
def broker(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(help="port on 127.0.0.1 (default: a free one)")] = None,
    fetch_only: Annotated[bool, typer.Option("--fetch-only", help="only fetch the Kafka jars")] = False,
) -> None:
    """Run a local single-node Kafka (KRaft) broker from cached Maven Central jars."""
    from ctd_monitor.local.broker import run_broker_forever

    s = settings(ctx)
    try:
        code = run_broker_forever(s.cache_dir, port, fetch_only)
    except CtdError as exc:
        fail(str(exc))
    raise typer.Exit(code)


if __name__ == "__main__":
    app()
