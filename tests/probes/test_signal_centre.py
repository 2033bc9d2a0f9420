"""The cascade's signals are defined around the calibrated cuts, not 0.5 (issue 21 point 6); bundles calibrated
before keep the signal their threshold was calibrated on."""

from __future__ import annotations

import numpy as np
import pytest

from probes.calibration.cascade_rule import Cuts
from probes.fitting.dv import dv_binary
from probes.fitting.heads import fit_dv, fit_logistic
from probes.heads.inference import logit, uncertainty, with_extra_features
from probes.runtime.bundle import Bundle, new_manifest
from probes.runtime.manifest import Calibration, Signal, UnsafeCut
from probes.runtime.monitor import head_scores, uncertainty_centre

CUT = 0.9996


def test_uncertainty_is_highest_at_the_cut_not_at_one_half() -> None:
    p = np.array([0.5, 0.9, 0.999, CUT, 0.99999])
    centred = uncertainty(p, CUT)
    assert int(np.argmax(centred)) == 3 and centred[3] == pytest.approx(0.0)
    # Ranked by log-odds from the cut: 0.999 and 0.99999 are nearer the decision than 0.9 and 0.5.
    assert list(np.argsort(-centred)) == [3, 2, 4, 1, 0]
    np.testing.assert_allclose(uncertainty(p), -np.abs(p - 0.5))  # the signal of earlier calibrations
    assert int(np.argmax(uncertainty(p))) == 0


def test_dv_extras_measure_the_margin_from_the_cut() -> None:
    x = np.zeros((3, 2), dtype=np.float32)
    p = np.array([0.2, 0.5, CUT])
    legacy = with_extra_features(x, p)
    centred = with_extra_features(x, p, CUT)
    np.testing.assert_allclose(legacy[:, 2], logit(p), rtol=1e-5)
    np.testing.assert_allclose(legacy[:, 3], np.abs(p - 0.5), rtol=1e-5)
    np.testing.assert_allclose(centred[:, 3], np.abs(logit(p) - logit(CUT)), rtol=1e-5, atol=1e-5)


def test_delegation_helps_is_judged_at_the_cuts() -> None:
    # A harmful item the probe scores 0.99: "unsafe" at 0.5, let through at the certified cut, where the expert
    # (0.7, its cut 0.6) fixes it; a benign 0.55 the probe flags at 0.5 but not at its cut.
    y, p, b = [1, 0], [0.99, 0.55], [0.7, 0.1]
    assert dv_binary(y, p, b).tolist() == [0, 1]
    assert dv_binary(y, p, b, Cuts(probe=CUT, expert=0.6)).tolist() == [1, 0]


def test_dv_head_trained_at_the_cuts_keeps_them_for_its_inputs() -> None:
    rng = np.random.default_rng(0)
    n = 600
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = rng.integers(0, 2, n)
    near = x[:, 0] > 0.8  # where the probe sits just under its cut and the expert is right
    p = np.where(near, 0.999, np.where(y == 1, 0.99999, 0.01))
    b = np.where(y == 1, 0.9, 0.1)
    fit = fit_dv(x, y, p, b, cuts=Cuts(probe=CUT, expert=0.5), seed=0)
    assert fit.positives == int((near & (y == 1)).sum()) > 10
    np.testing.assert_array_equal(fit.inputs(x, p), with_extra_features(x, p, CUT))
    d = fit.head.logit(fit.inputs(x, p))
    assert d[near & (y == 1)].mean() > d[~near].mean()


def _bundle(calibration: Calibration | None) -> Bundle:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    manifest = new_manifest(model={"spec": "minilm-l6", "weights_sha256": "a" * 64, "max_tokens": 64},
                            features={"layer": 1, "pooling": "mean"}, data={})
    cut = UnsafeCut(scorer="probe", cut=CUT, valid=True, epsilon=0.05, delta=0.1, n=100, fpr=0.04)
    manifest = manifest.replace(unsafe_cut=cut, calibration=calibration)
    return Bundle(manifest=manifest, heads={"safety": fit_logistic(x, (x[:, 0] > 0).astype(int))})


def _calibration(centre: float | None) -> Calibration:
    return Calibration(signal=Signal.UNCERTAINTY, variant="pareto", alpha=0.1, delta=0.1, threshold=-0.2,
                       uncertainty_centre=centre)


def test_the_worker_computes_the_signal_its_threshold_was_calibrated_on() -> None:
    x = np.random.default_rng(1).normal(size=(20, 4)).astype(np.float32)
    legacy, centred, uncalibrated = _bundle(_calibration(None)), _bundle(_calibration(CUT)), _bundle(None)
    p = legacy.heads["safety"].proba(x)
    assert uncertainty_centre(legacy.manifest) is None
    np.testing.assert_allclose(head_scores(legacy, x, Signal.UNCERTAINTY).signal, -np.abs(p - 0.5))
    assert uncertainty_centre(centred.manifest) == CUT
    np.testing.assert_allclose(head_scores(centred, x, Signal.UNCERTAINTY).signal, uncertainty(p, CUT))
    # Not calibrated yet (what calibration itself computes): around the bundle's cut.
    assert uncertainty_centre(uncalibrated.manifest) == CUT
    np.testing.assert_allclose(head_scores(legacy, x, Signal.UNCERTAINTY, centre=CUT).signal, uncertainty(p, CUT))
