"""The typed manifest: format 1 bundles (as written before it existed) load, format 2 round-trips."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from probes.calibration.ltt import calibrate_unsafe_cut
from probes.errors import BundleError
from probes.runtime.bundle import HEADS_FILE, MANIFEST, load_bundle, read_manifest, update_manifest
from probes.runtime.manifest import DEFAULT_UNSAFE_CUT, FORMAT_VERSION, BundleManifest, Signal
from probes.runtime.monitor import DelegationRule

# A format-1 manifest exactly as `train` + `train-dv` + `calibrate` wrote it (values shortened, keys complete).
V1 = {
    "format_version": 1,
    "created_at": "2026-11-20T10:00:00+00:00",
    "bundle_id": "0123456789abcdef",
    "model": {"spec": "minilm-l6", "model_id": "sentence-transformers/all-MiniLM-L6-v2", "weights_sha256": "a" * 64,
              "max_tokens": 64, "dtype": "fp32", "num_layers": 6, "hidden_size": 384},
    "features": {"layer": 4, "pooling": "mean"},
    "data": {"datasets_dir": "/data", "file_sha256": {"xstest.jsonl": "b" * 64}, "content_hash": "c" * 64,
             "max_per_source": 60, "balance_with": "alpaca_benign", "sources": [], "categories": [], "split_seed": 0,
             "split_fractions": {"probe_train": 0.5, "dev": 0.2, "calibration": 0.15, "evaluation": 0.15},
             "split_sizes": {"evaluation": {"n": 30, "positives": 14}}},
    "files": {HEADS_FILE: "d" * 64},
    "head_names": ["dv", "safety"],
    "heads": {
        "safety": {"type": "logistic", "c": 0.5, "n_train": 100, "output": "p_unsafe"},
        "dv": {"type": "logistic", "target": "binary", "extra_features": ["probe_logit", "abs_margin"],
               "feature_set": "margin", "cv_auroc": {"margin": 0.9}, "regularization": 0.01, "n_train": 150,
               "train_positives": 12, "trained_on": "crossfit",
               "expert_accuracy": {"probe_train_in_sample": 0.99, "dev_out_of_sample": 0.9}},
        "router": {"type": "mlp", "hidden": [256, 64], "target": "binary", "trained_on": "crossfit"},
    },
    "metrics": {"safety_probe": {"evaluation": {"auroc": 0.95}}},
    "calibration": {"signal": "dv", "variant": "pareto", "alpha": 0.1, "delta": 0.1, "threshold": 0.42, "n_cal": 90,
                    "n_opt": 27, "n_ht": 63, "seed": 0, "certified": 12, "tested": 40, "ht_rate": 0.05,
                    "opt_error": 0.1, "grid_size": 200, "extra": {}, "valid": True},
    "expert": {"backend": "encoder-head", "path": "/cache/expert", "name": "encoder-head:abc",
               "evaluation": {"auroc": 0.97}},
}


def test_a_format_1_manifest_loads_typed() -> None:
    m = BundleManifest.from_json(orjson.dumps(V1))
    assert m.format_version == FORMAT_VERSION == 2
    assert m.calibration is not None and m.calibration.signal is Signal.DV and m.calibration.threshold == 0.42
    assert m.heads["dv"].extra_features == ("probe_logit", "abs_margin") and m.heads["router"].hidden == (256, 64)
    assert m.expert is not None and m.expert.path == "/cache/expert"
    # No cut in a format-1 bundle: the default applies and says it is one.
    assert m.unsafe_cut is None and m.probe_cut == DEFAULT_UNSAFE_CUT and m.expert_cut("encoder-head:abc") is None
    assert DelegationRule.from_manifest(m) == DelegationRule(Signal.DV, 0.42, 0.1, "pareto")


def test_round_trip_writes_format_2_and_keeps_every_section(tmp_path: Path) -> None:
    m = BundleManifest.from_json(orjson.dumps(V1))
    cut = calibrate_unsafe_cut([0.1, 0.2, 0.9] * 200, [0, 0, 1] * 200, epsilon=0.05, delta=0.1, scorer="probe")
    m2 = BundleManifest.from_json(m.replace(unsafe_cut=cut).to_json())
    assert m2.unsafe_cut == cut and m2.probe_cut == cut.cut and m2.calibration == m.calibration
    raw = orjson.loads(m2.to_json())
    assert raw["format_version"] == 2 and raw["calibration"]["valid"] is True and "extra" not in raw["calibration"]
    assert raw["unsafe_cut"] == {"scorer": "probe", "cut": cut.cut, "valid": True, "epsilon": 0.05, "delta": 0.1,
                                 "n": 400, "fpr": cut.fpr, "certified": cut.certified, "tested": cut.tested}
    assert BundleManifest.from_json(m2.to_json()) == m2


def test_expert_cut_belongs_to_its_expert() -> None:
    cut = calibrate_unsafe_cut([0.1] * 300 + [0.9] * 100, [0] * 300 + [1] * 100, epsilon=0.05, delta=0.1,
                               scorer="encoder-head:abc")
    m = BundleManifest.from_json(orjson.dumps(V1)).replace(expert_unsafe_cut=cut)
    assert m.expert_cut("encoder-head:abc") == cut and m.expert_cut("hf-guard:other") is None


def test_update_manifest_on_a_format_1_bundle_upgrades_it(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_bytes(orjson.dumps(V1))
    update_manifest(tmp_path, metrics={"note": 1})
    assert orjson.loads((tmp_path / MANIFEST).read_bytes())["format_version"] == 2
    assert read_manifest(tmp_path).metrics == {"note": 1}


@pytest.mark.parametrize("change", [
    {"format_version": 3},
    {"calibration": {"signal": "sparkle", "variant": "pareto", "alpha": 0.1, "delta": 0.1, "threshold": 0.1}},
    {"heads": {"safety": {"type": "forest"}}},
    {"surprise": 1},
])
def test_bad_manifests_are_refused_with_a_bundle_error(tmp_path: Path, change: dict[str, object]) -> None:
    (tmp_path / MANIFEST).write_bytes(orjson.dumps({**V1, **change}))
    with pytest.raises(BundleError):
        read_manifest(tmp_path)
    with pytest.raises(BundleError):
        load_bundle(tmp_path)
