"""What every command shares: the global options, settings loading, errors as exit code 2, JSON output."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer

from ctd_monitor.progress import console
from probes.config import Settings, load_settings
from probes.errors import CtdError
from probes.logs import configure_logging

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML/TOML config file (env CTD_* wins)")]
DataOpt = Annotated[
    list[Path] | None, typer.Option("--data", help="dataset file(s); default: the configured training mix")
]
BundleOpt = Annotated[Path, typer.Option("--bundle", help="probe bundle directory")]


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


def guarded(fn: Any) -> Any:
    """Turn the project's own errors into a clear one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CtdError as exc:
            fail(str(exc))

    return wrapper
