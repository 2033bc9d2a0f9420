"""Probe bundle: a directory of safetensors heads plus ``manifest.json``; no pickle anywhere.

Loading verifies every file's sha256 against the manifest and refuses a bundle trained on another model.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from safetensors.numpy import load_file, save_file

from probes.cache import atomic_write_bytes, sha256_file
from probes.errors import BundleError, BundleIntegrityError, BundleModelMismatch
from probes.heads import LinearHead

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HEADS_FILE = "heads.safetensors"


@dataclass
class Bundle:
    """Heads and the manifest that says how to reproduce and apply them."""

    manifest: dict[str, Any]
    heads: dict[str, LinearHead] = field(default_factory=dict)
    extra_tensors: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.manifest["model"])

    @property
    def features(self) -> dict[str, Any]:
        return dict(self.manifest["features"])

    def check_model(self, spec: str, weights_sha256: str) -> None:
        want = self.manifest["model"]
        if want["weights_sha256"] != weights_sha256:
            raise BundleModelMismatch(
                f"bundle was trained on {want['spec']} (weights {want['weights_sha256'][:12]}), "
                f"but {spec} (weights {weights_sha256[:12]}) is loaded"
            )

    @property
    def version(self) -> str:
        return str(self.manifest.get("bundle_id", "unknown"))


def new_manifest(*, model: dict[str, Any], features: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "model": model,
        "features": features,
        "data": data,
        "heads": {},
        "metrics": {},
        "calibration": None,
    }


def save_bundle(bundle: Bundle, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, npt.NDArray[np.float32]] = {}
    for name, head in bundle.heads.items():
        tensors.update(head.to_tensors(name))
    tensors.update(bundle.extra_tensors)
    heads_path = directory / HEADS_FILE
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(heads_path))
    manifest = dict(bundle.manifest)
    manifest["files"] = {HEADS_FILE: sha256_file(heads_path)}
    manifest["head_names"] = sorted(bundle.heads)
    manifest["bundle_id"] = manifest["files"][HEADS_FILE][:16]
    bundle.manifest = manifest
    atomic_write_bytes(directory / MANIFEST, orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return directory


def update_manifest(directory: Path, **sections: Any) -> dict[str, Any]:
    """Rewrite manifest sections (e.g. calibration) without touching the verified tensor files."""
    manifest = read_manifest(directory)
    manifest.update(sections)
    atomic_write_bytes(directory / MANIFEST, orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise BundleError(f"not a probe bundle (no {MANIFEST}): {directory}")
    try:
        manifest = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise BundleError(f"unreadable manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"unsupported bundle format in {path}: {manifest.get('format_version')!r}")
    return manifest


def load_bundle(directory: Path) -> Bundle:
    manifest = read_manifest(directory)
    files = manifest.get("files") or {}
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise BundleIntegrityError(f"bundle file missing: {path}")
        actual = sha256_file(path)
        if actual != digest:
            raise BundleIntegrityError(f"sha256 mismatch for {path}: manifest {digest[:12]}, file {actual[:12]}")
    tensors = load_file(str(directory / HEADS_FILE))
    heads = {name: LinearHead.from_tensors(tensors, name) for name in manifest.get("head_names", [])}
    used = {f"{n}.{part}" for n in heads for part in ("mean", "scale", "weight", "bias")}
    extra = {k: v for k, v in tensors.items() if k not in used}
    return Bundle(manifest=manifest, heads=heads, extra_tensors=extra)
