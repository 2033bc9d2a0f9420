"""``ctd-monitor``: train probes and experts offline, run the streaming monitor, benchmark it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer

from ctd_monitor.progress import console, progress_bars
from probes.config import Settings, load_settings
from probes.errors import CtdError
from probes.logs import configure_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML/TOML config file (env CTD_* wins)")]
DataOpt = Annotated[
    list[Path] | None, typer.Option("--data", help="dataset file(s); default: the configured training mix")
]


class State:
    config: Path | None = None
    progress: bool = True


state = State()


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def settings(config: Path | None = None, *, cls: type[Settings] = Settings, **overrides: Any) -> Any:
    try:
        loaded = load_settings(config or state.config, cls=cls, **overrides)
    except CtdError as exc:
        fail(str(exc))
    configure_logging(loaded.log_level)
    return loaded


def emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")


@app.callback()
def main(
    config: ConfigOpt = None,
    progress: Annotated[bool, typer.Option(help="show progress bars on stderr")] = True,
) -> None:
    state.config = config
    state.progress = progress


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
def extract(data: DataOpt = None) -> None:
    """Extract pooled activations for the dataset mix (cached on disk; reruns are instant)."""
    from probes import pipeline

    s = settings()
    prepared = pipeline.prepare_data(s, data)
    loaded = pipeline.load_monitored_model(s)
    with progress_bars(state.progress) as bars:
        features, cached = pipeline.extract_features(
            s, pipeline.make_extractor(s, loaded), list(prepared.dataset.records),
            prepared.dataset.content_hash(), bars,
        )
    emit({"n": int(features.shape[0]), "dim": int(features.shape[1]), "cached": cached,
          "layer": s.features.layer, "pooling": s.features.pooling, "model": loaded.model_id})


@app.command("train-probe")
@_guarded
def train_probe(
    out: Annotated[Path, typer.Option(help="bundle directory to write")] = Path("runs/bundle"),
    data: DataOpt = None,
) -> None:
    """Train the safety probe on probe-train and write a probe bundle; print evaluation metrics."""
    from probes import pipeline

    s = settings()
    with progress_bars(state.progress) as bars:
        result = pipeline.train_probe(s, out, bars, prepared=pipeline.prepare_data(s, data))
    emit({"bundle": str(result.bundle_dir), "features_cached": result.features_cached, **result.metrics})


@app.command("train-expert")
@_guarded
def train_expert(
    data: DataOpt = None,
    force: Annotated[bool, typer.Option(help="retrain even if a cached expert matches")] = False,
) -> None:
    """Fine-tune the encoder-head expert (cached outside the repo); print its evaluation metrics."""
    from probes import pipeline

    s = settings()
    with progress_bars(state.progress) as bars:
        result = pipeline.train_expert(s, bars, prepared=pipeline.prepare_data(s, data), force=force)
    emit({"expert": str(result.expert_dir), "name": result.name, "evaluation": result.metrics})


@app.command()
@_guarded
def train(
    out: Annotated[Path, typer.Option(help="bundle directory to write")] = Path("runs/bundle"),
    data: DataOpt = None,
) -> None:
    """Train probe and expert on the shared data; print probe-only vs expert-only on the evaluation split."""
    from probes import pipeline
    from probes.bundle import update_manifest

    s = settings()
    with progress_bars(state.progress) as bars:
        prepared = pipeline.prepare_data(s, data)
        probe = pipeline.train_probe(s, out, bars, prepared=prepared)
        expert = pipeline.train_expert(s, bars, prepared=prepared)
    manifest = update_manifest(out, expert={"backend": "encoder-head", "path": str(expert.expert_dir),
                                            "name": expert.name, "evaluation": expert.metrics})
    emit({"bundle": str(out), "split_sizes": manifest["data"]["split_sizes"],
          "probe_only": probe.metrics["evaluation"], "expert_only": expert.metrics, "expert": expert.name})


@app.command()
@_guarded
def run(
    bundle: Annotated[Path | None, typer.Option(help="probe bundle (default: worker.bundle)")] = None,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers")] = None,
) -> None:
    """Run the streaming monitor worker until SIGTERM/SIGINT (drains, commits and leaves the group)."""
    from worker.config import WorkerSettings
    from worker.runner import run_worker

    s: WorkerSettings = settings(cls=WorkerSettings)
    updates: dict[str, Any] = {}
    if bundle is not None:
        updates["worker"] = s.worker.model_copy(update={"bundle": bundle})
    if bootstrap is not None:
        updates["kafka"] = s.kafka.model_copy(update={"bootstrap_servers": bootstrap})
    run_worker(s.model_copy(update=updates))


@app.command()
@_guarded
def replay(
    data: Annotated[list[Path], typer.Option("--data", help="dataset file(s) to replay")],
    rate: Annotated[float | None, typer.Option(help="events per second (default: as fast as possible)")] = None,
    limit: Annotated[int | None, typer.Option(help="replay at most N conversations")] = None,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers")] = None,
) -> None:
    """Produce dataset conversations as events (labels in metadata) to the input topic."""
    import asyncio

    from worker.config import WorkerSettings
    from worker.runner import replay as do_replay

    s: WorkerSettings = settings(cls=WorkerSettings)
    if bootstrap is not None:
        s = s.model_copy(update={"kafka": s.kafka.model_copy(update={"bootstrap_servers": bootstrap})})
    with progress_bars(state.progress) as bars:
        result = asyncio.run(do_replay(s, data, rate=rate, limit=limit, progress=bars("replay", limit or 0)))
    emit(result)


@app.command()
def schemas(
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
def broker(
    port: Annotated[int | None, typer.Option(help="port on 127.0.0.1 (default: a free one)")] = None,
    fetch_only: Annotated[bool, typer.Option("--fetch-only", help="only fetch the Kafka jars")] = False,
) -> None:
    """Run a local single-node Kafka (KRaft) broker from cached Maven Central jars."""
    from worker.broker import run_broker_forever

    s = settings()
    try:
        code = run_broker_forever(s.cache_dir, port, fetch_only)
    except CtdError as exc:
        fail(str(exc))
    raise typer.Exit(code)


if __name__ == "__main__":
    app()
