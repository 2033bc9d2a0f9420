"""The exception hierarchy of ctd-monitor.

CtdError                      base of every error this project raises on purpose
├── ConfigError               a configuration value or file is invalid
├── DataError                 a dataset file is missing or a line is malformed (names file and line)
├── ModelSpecError            a model spec cannot be resolved or loaded
├── BundleError               a probe bundle is unreadable or inconsistent
│   ├── BundleIntegrityError  a file's sha256 does not match the manifest
│   └── BundleModelMismatch   the bundle was trained on another model than the one loaded
└── ExpertError               an expert backend failed to score
    └── ExpertUnavailable     the expert cannot be reached now (retry later; nothing is lost)
"""

from __future__ import annotations

from pathlib import Path


class CtdError(Exception):
    """Base class of every error ctd-monitor raises on purpose."""


class ConfigError(CtdError):
    """A configuration value or file is invalid."""


class DataError(CtdError):
    """A dataset file is missing or malformed."""

    def __init__(self, message: str, *, path: Path | str | None = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f":{line}"
            where += ": "
        super().__init__(f"{where}{message}")
        self.path = None if path is None else Path(path)
        self.line = line


class ModelSpecError(CtdError):
    """A model spec cannot be resolved or loaded."""


class BundleError(CtdError):
    """A probe bundle is unreadable or inconsistent."""


class BundleIntegrityError(BundleError):
    """A bundle file's sha256 does not match its manifest."""


class BundleModelMismatch(BundleError):
    """The bundle was trained on another monitored model than the one loaded."""


class ExpertError(CtdError):
    """An expert backend failed to score a batch."""


class ExpertUnavailable(ExpertError):
    """The expert cannot be reached right now; the caller should retry later."""
