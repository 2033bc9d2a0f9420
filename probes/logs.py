"""structlog JSON logging with the orjson renderer.

Conversation text is never logged by default: call sites log ids, counts and scores only.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import orjson
import structlog


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is *now*: test runners and CLIs swap it after configuration."""

    def write(self, data: bytes) -> None:
        stream = sys.stderr
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            buffer.write(data)
        else:
            stream.write(data.decode("utf-8", "replace"))

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "INFO", path: Path | None = None) -> None:
    """Configure structlog once per process; safe to call again (the last call wins).

    ``path`` sends the JSON lines to a file instead of stderr (the demo keeps its terminal for progress).
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.BytesLoggerFactory(
            file=_CurrentStderr() if path is None else path.open("ab")  # type: ignore[arg-type]
        ),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
