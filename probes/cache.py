"""Content hashing and atomic writes for the on-disk caches (converted models, features, experts)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file_cached(path: Path) -> str:
    """sha256 of a large file, remembered beside it keyed by size and mtime (rehashing 500 MB costs seconds)."""
    stat = path.stat()
    sidecar = path.with_name(path.name + ".sha256.json")
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if sidecar.is_file():
        try:
            saved = orjson.loads(sidecar.read_bytes())
            if saved.get("key") == key:
                return str(saved["sha256"])
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError):  # e.g. a sidecar another user wrote
            pass
    value = sha256_file(path)
    try:
        atomic_write_bytes(sidecar, orjson.dumps({"key": key, "sha256": value}))
    except OSError:
        pass  # read-only location: hashing again next time is only slower
    return value


def sha256_text(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target`` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
