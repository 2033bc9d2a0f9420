"""Probe bundle: a directory of safetensors heads plus ``manifest.json``; no pickle anywhere.

Loading verifies every file's sha256 against the manifest and refuses a bundle trained on another model.
The manifest is read once, into a typed ``BundleManifest`` (``probes.runtime.manifest``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file, save_file

from probes.cache import atomic_write_bytes, sha256_file
from probes.errors import BundleError, BundleIntegrityError, BundleModelMismatch
from probes.heads.inference import LinearHead
from probes.runtime.manifest import FORMAT_VERSION, BundleManifest, DataRecipe, FeatureInfo, ModelInfo

__all__ = ["FORMAT_VERSION", "HEADS_FILE", "MANIFEST", "Bundle", "load_bundle", "new_manifest", "read_manifest",
           "save_bundle", "update_manifest"]

MANIFEST = "manifest.json"
HEADS_FILE = "heads.safetensors"


@dataclass
class Bundle:
    """Heads and the manifest that says how to reproduce and apply them."""

    manifest: BundleManifest
    heads: dict[str, LinearHead] = field(default_factory=dict)
    extra_tensors: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)

    @property
    def model(self) -> ModelInfo:
        return self.manifest.model

    @property
    def features(self) -> FeatureInfo:
        return self.manifest.features

    def check_model(self, spec: str, weights_sha256: str) -> None:
        want = self.manifest.model
        if want.weights_sha256 != weights_sha256:
            raise BundleModelMismatch(
                f"bundle was trained on {want.spec} (weights {want.weights_sha256[:12]}), "
                f"but {spec} (weights {weights_sha256[:12]}) is loaded"
            )

    @property
    def version(self) -> str:
        return self.manifest.version


def new_manifest(*, model: dict[str, Any] | ModelInfo, features: dict[str, Any] | FeatureInfo,
                 data: dict[str, Any] | DataRecipe) -> BundleManifest:
    return BundleManifest.model_validate({"model": model, "features": features, "data": data})


def save_bundle(bundle: Bundle, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, npt.NDArray[np.float32]] = {}
    for name, head in bundle.heads.items():
        tensors.update(head.to_tensors(name))
    tensors.update(bundle.extra_tensors)
    heads_path = directory / HEADS_FILE
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(heads_path))
    digest = sha256_file(heads_path)
    bundle.manifest = bundle.manifest.replace(files={HEADS_FILE: digest}, head_names=tuple(sorted(bundle.heads)),
                                              bundle_id=digest[:16])
    atomic_write_bytes(directory / MANIFEST, bundle.manifest.to_json())
    return directory


def update_manifest(directory: Path, **sections: Any) -> BundleManifest:
    """Rewrite manifest sections (e.g. calibration) without touching the verified tensor files."""
    manifest = read_manifest(directory).replace(**sections)
    atomic_write_bytes(directory / MANIFEST, manifest.to_json())
    return manifest


def read_manifest(directory: Path) -> BundleManifest:
    path = directory / MANIFEST
    if not path.is_file():
        raise BundleError(f"not a probe bundle (no {MANIFEST}): {directory}")
    return BundleManifest.from_json(path.read_bytes(), where=str(path))


def load_bundle(directory: Path) -> Bundle:
    """The bundle in ``directory``, after checking that the manifest lists every file the loader reads, that each
    listed name stays inside the bundle directory, and that each file's sha256 matches."""
    manifest = read_manifest(directory)
    if HEADS_FILE not in manifest.files:
        # Without it in the list, the tensors would be loaded unverified: refuse rather than trust them.
        raise BundleIntegrityError(f"manifest of {directory} does not list {HEADS_FILE} in files")
    root = directory.resolve()
    for name, digest in manifest.files.items():
        path = directory / name
        if not path.resolve().is_relative_to(root):
            raise BundleIntegrityError(f"bundle file {name!r} lies outside the bundle directory {directory}")
        if not path.is_file():
            raise BundleIntegrityError(f"bundle file missing: {path}")
        actual = sha256_file(path)
        if actual != digest:
            raise BundleIntegrityError(f"sha256 mismatch for {path}: manifest {digest[:12]}, file {actual[:12]}")
    tensors = load_file(str(directory / HEADS_FILE))
    heads = {name: LinearHead.from_tensors(tensors, name) for name in manifest.head_names}
    used = {f"{n}.{part}" for n in heads for part in ("mean", "scale", "weight", "bias")}
    extra = {k: v for k, v in tensors.items() if k not in used}
    return Bundle(manifest=manifest, heads=heads, extra_tensors=extra)
