"""Per-record vectors on disk, keyed by a namespace and each record's content hash.

A namespace says *how* a vector was computed (model and weights hash, layer, pooling, max tokens, dtype,
or an expert's version); the record key says *of what* (the hash of the record's roles and texts,
``Record.content_key``). A new combination of files therefore only computes the records it has not seen:
the cache is per record, not per file list.

Storage is append-only: each ``put`` writes one safetensors chunk (vectors plus their keys) in the
namespace's directory, atomically, so concurrent writers never corrupt each other; a reader indexes every
chunk once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from probes.cache import sha256_text
from probes.logs import get_logger

log = get_logger(__name__)
F32 = npt.NDArray[np.float32]
KEY_CHARS = 32


def namespace_key(*parts: str) -> str:
    return sha256_text(*parts, "records-v1")[:32]


def encode_keys(keys: Sequence[str]) -> npt.NDArray[np.uint8]:
    """Content keys as a fixed-width byte matrix, the form safetensors can store (every per-record store's index)."""
    raw = "".join(k[:KEY_CHARS].ljust(KEY_CHARS, "0") for k in keys).encode("ascii")
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(keys), KEY_CHARS).copy()


def decode_keys(array: npt.NDArray[np.uint8]) -> list[str]:
    """The keys ``encode_keys`` stored."""
    return [bytes(row).decode("ascii") for row in array]


@dataclass
class Lookup:
    """Rows found for the requested keys; ``missing`` are positions in the request with no vector."""

    values: F32
    missing: list[int]


class RecordStore:
    """Vectors of width ``dim`` per record key in one namespace directory."""

    def __init__(self, root: Path, namespace: str, *, description: dict[str, str] | None = None):
        self.dir = root / "records" / namespace
        self.namespace = namespace
        self.description = description or {}
        self._index: dict[str, F32] | None = None
        self.hits = 0
        self.misses = 0

    def _load(self) -> dict[str, F32]:
        if self._index is None:
            index: dict[str, F32] = {}
            for path in sorted(self.dir.glob("*.safetensors")) if self.dir.is_dir() else []:
                try:
                    tensors = load_file(str(path))
                except (SafetensorError, OSError) as exc:  # a half-copied chunk: recompute its rows
                    log.warning("record_cache.bad_chunk", path=str(path), error=str(exc))
                    continue
                for key, row in zip(decode_keys(tensors["keys"]), tensors["values"], strict=True):
                    index[key] = row
            self._index = index
        return self._index

    def __len__(self) -> int:
        return len(self._load())

    def rows(self, keys: Sequence[str], dim: int | None) -> Lookup:
        index = self._load()
        short = [k[:KEY_CHARS] for k in keys]
        missing = [i for i, k in enumerate(short) if k not in index]
        found = next((index[k] for k in short if k in index), None)
        width = dim if dim is not None else (found.shape[0] if found is not None else 0)
        out = np.zeros((len(keys), width), dtype=np.float32)
        for i, k in enumerate(short):
            row = index.get(k)
            if row is not None:
                out[i] = row
        return Lookup(values=out, missing=missing)

    def missing(self, keys: Sequence[str]) -> int:
        """How many distinct keys have no vector yet (no hit/miss accounting)."""
        index = self._load()
        return len({k[:KEY_CHARS] for k in keys} - index.keys())

    def get(self, keys: Sequence[str], dim: int | None = None) -> Lookup:
        lookup = self.rows(keys, dim)
        self.hits += len(keys) - len(lookup.missing)
        self.misses += len(lookup.missing)
        return lookup

    def put(self, keys: Sequence[str], values: npt.ArrayLike) -> None:
        array = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
        if array.ndim != 2 or array.shape[0] != len(keys):
            raise ValueError(f"need one row per key: {array.shape} for {len(keys)} keys")
        if not keys:
            return
        name = sha256_text(*keys)[:24]
        self.dir.mkdir(parents=True, exist_ok=True)
        # A private temporary name, then one rename: concurrent writers (two workers, two CLI runs) of the
        # same chunk never see each other's half-written file.
        tmp = self.dir / f".{name}.{os.getpid()}.{threading.get_ident()}.partial"
        try:
            save_file({"keys": encode_keys(keys), "values": array}, str(tmp), metadata=self.description or None)
            os.replace(tmp, self.dir / f"{name}.safetensors")
        finally:
            tmp.unlink(missing_ok=True)
        index = self._load()
        for key, row in zip(keys, array, strict=True):
            index[key[:KEY_CHARS]] = row

    def get_or_compute(
        self, keys: Sequence[str], compute: Callable[[list[int]], npt.ArrayLike], *, dim: int | None = None,
        chunk: int = 512,
    ) -> tuple[F32, int]:
        """Vectors for ``keys``; ``compute(positions)`` runs only on the missing ones (in chunks, each stored
        as soon as it is done so an interrupted run keeps its work). Returns (vectors, number computed)."""
        lookup = self.get(keys, dim)
        seen: set[str] = set()
        todo: list[int] = []
        for i in lookup.missing:  # duplicate keys in one request are computed once
            if keys[i][:KEY_CHARS] not in seen:
                seen.add(keys[i][:KEY_CHARS])
                todo.append(i)
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            computed = np.asarray(compute(part), dtype=np.float32)
            self.put([keys[i] for i in part], computed[:, None] if computed.ndim == 1 else computed)
        if not todo:
            return lookup.values, 0
        return self.rows(keys, dim).values, len(todo)
