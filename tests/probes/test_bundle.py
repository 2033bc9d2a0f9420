from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from probes.errors import BundleError, BundleIntegrityError, BundleModelMismatch
from probes.fitting.heads import fit_logistic
from probes.runtime.bundle import (
    HEADS_FILE,
    MANIFEST,
    Bundle,
    load_bundle,
    new_manifest,
    save_bundle,
    update_manifest,
)


def _bundle() -> Bundle:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    manifest = new_manifest(
        model={"spec": "minilm-l6", "weights_sha256": "a" * 64, "max_tokens": 64},
        features={"layer": 3, "pooling": "mean"},
        data={"split_sizes": {"probe_train": {"n": 60, "positives": int(y.sum())}}},
    )
    return Bundle(manifest=manifest, heads={"safety": fit_logistic(x, y)})


def test_roundtrip(tmp_path: Path) -> None:
    original = _bundle()
    save_bundle(original, tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    x = np.random.default_rng(1).normal(size=(5, 8))
    np.testing.assert_allclose(loaded.heads["safety"].proba(x), original.heads["safety"].proba(x))
    assert (loaded.features.layer, loaded.features.pooling) == (3, "mean")
    assert loaded.manifest.files[HEADS_FILE] and loaded.version == loaded.manifest.files[HEADS_FILE][:16]
    assert loaded.manifest == original.manifest
    # no pickle anywhere: only json and safetensors in the bundle
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [HEADS_FILE, MANIFEST]


def test_tampered_file_refused(tmp_path: Path) -> None:
    save_bundle(_bundle(), tmp_path / "b")
    path = tmp_path / "b" / HEADS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="sha256 mismatch"):
        load_bundle(tmp_path / "b")


def test_model_mismatch_refused(tmp_path: Path) -> None:
    save_bundle(_bundle(), tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    bundle.check_model("minilm-l6", "a" * 64)
    with pytest.raises(BundleModelMismatch, match="trained on minilm-l6"):
        bundle.check_model("smollm2-135m-instruct", "b" * 64)


def test_not_a_bundle_and_bad_format(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a probe bundle"):
        load_bundle(tmp_path)
    save_bundle(_bundle(), tmp_path / "b")
    manifest = orjson.loads((tmp_path / "b" / MANIFEST).read_bytes())
    manifest["format_version"] = 99
    (tmp_path / "b" / MANIFEST).write_bytes(orjson.dumps(manifest))
    with pytest.raises(BundleError, match="unsupported bundle format"):
        load_bundle(tmp_path / "b")


def test_update_manifest_keeps_tensors_valid(tmp_path: Path) -> None:
    save_bundle(_bundle(), tmp_path / "b")
    update_manifest(tmp_path / "b", calibration={"signal": "uncertainty", "variant": "budget", "alpha": 0.1,
                                                 "delta": 0.1, "threshold": -0.3})
    calibration = load_bundle(tmp_path / "b").manifest.calibration
    assert calibration is not None and calibration.threshold == -0.3 and calibration.valid


def test_update_manifest_refuses_an_untyped_section(tmp_path: Path) -> None:
    save_bundle(_bundle(), tmp_path / "b")
    with pytest.raises(BundleError, match="invalid manifest change"):
        update_manifest(tmp_path / "b", calibration={"tau": 0.3})
    load_bundle(tmp_path / "b")  # the manifest on disk is untouched


def _rewrite_files(directory: Path, files: dict[str, str]) -> None:
    path = directory / MANIFEST
    manifest = orjson.loads(path.read_bytes())
    manifest["files"] = files
    path.write_bytes(orjson.dumps(manifest))


def test_a_manifest_without_a_complete_files_list_is_refused(tmp_path: Path) -> None:
    """Issue 14 point 9: an empty (or partial) files list used to load the tensors unverified."""
    save_bundle(_bundle(), tmp_path / "b")
    _rewrite_files(tmp_path / "b", {})
    with pytest.raises(BundleIntegrityError, match=f"does not list {HEADS_FILE}"):
        load_bundle(tmp_path / "b")


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "sub/../../outside.bin"])
def test_file_names_must_stay_inside_the_bundle(tmp_path: Path, name: str) -> None:
    save_bundle(_bundle(), tmp_path / "b")
    (tmp_path / "outside.bin").write_bytes(b"x")
    digest = orjson.loads((tmp_path / "b" / MANIFEST).read_bytes())["files"][HEADS_FILE]
    _rewrite_files(tmp_path / "b", {HEADS_FILE: digest, name: "0" * 64})
    with pytest.raises(BundleIntegrityError, match="outside the bundle directory"):
        load_bundle(tmp_path / "b")


@pytest.mark.parametrize("balance", [True, False])
def test_a_bundle_re_derives_the_data_recipe_it_was_trained_on(tmp_path: Path, datasets_dir: Path,
                                                               balance: bool) -> None:
    """Calibration and evaluation rebuild the bundle's splits from its manifest: per-source class balance (the
    default now, not before) is part of the recipe, or the content hash no longer matches and nothing calibrates."""
    from probes.config import DataConfig, Settings
    from probes.evaluation.cascade import settings_for_bundle
    from probes.fitting.pipeline import data_section, prepare_data

    trained = Settings(cache_dir=tmp_path, data=DataConfig(
        datasets_dir=datasets_dir, files=("coconot.jsonl", "harmbench.jsonl"), max_per_source=40,
        class_balance_per_source=balance, balance_with=None))
    prepared = prepare_data(trained)
    bundle = _bundle()
    bundle.manifest = new_manifest(model=bundle.manifest.model.model_dump(), features={"layer": 3, "pooling": "mean"},
                                   data=data_section(trained, prepared))
    save_bundle(bundle, tmp_path / "b")
    again = settings_for_bundle(Settings(cache_dir=tmp_path), load_bundle(tmp_path / "b"))
    assert again.data.class_balance_per_source is balance
    assert prepare_data(again).dataset.content_hash() == prepared.dataset.content_hash()
