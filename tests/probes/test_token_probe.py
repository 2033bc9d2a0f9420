from __future__ import annotations

import numpy as np
import pytest

from probes.activations.features import ema_scores
from probes.fitting.token_train import calibrate_stop
from probes.heads.token_probe import AGGREGATORS, StreamAggregate, first_crossing, rolling_means, smoothed


def reference_ema(z: list[float], decay: float) -> list[float]:
    out, s = [], 0.0
    for t, v in enumerate(z):
        s = v if t == 0 else decay * s + (1 - decay) * v
        out.append(s)
    return out


def reference_rolling(z: list[float], k: int) -> list[float]:
    return [sum(z[max(0, t - k + 1) : t + 1]) / len(z[max(0, t - k + 1) : t + 1]) for t in range(len(z))]


@pytest.mark.parametrize("window", [1, 3, 16, 100])
def test_rolling_means_match_a_reference_loop(window: int) -> None:
    z = np.random.default_rng(window).normal(size=57).tolist()
    np.testing.assert_allclose(rolling_means(z, window), reference_rolling(z, window), rtol=1e-12, atol=1e-12)


def test_ema_matches_a_reference_loop_and_the_features_helper() -> None:
    z = np.random.default_rng(1).normal(size=40).tolist()
    np.testing.assert_allclose(smoothed(z, "ema", decay=0.8, window=4), reference_ema(z, 0.8), rtol=1e-12)
    np.testing.assert_array_equal(smoothed(z, "ema", decay=0.8, window=4), ema_scores(z, 0.8))


@pytest.mark.parametrize("cuts", [[40], [1, 39], [5, 0, 17, 18], [1] * 40])
def test_streamed_aggregate_equals_offline_for_any_split(cuts: list[int]) -> None:
    z = np.random.default_rng(2).normal(size=40)
    agg = StreamAggregate(decay=0.9, window=7)
    pushed: dict[str, list[float]] = {a: [] for a in AGGREGATORS}
    start = 0
    for n in cuts:
        for a, values in agg.push(z[start : start + n]).items():
            pushed[a].extend(values.tolist())
        start += n
    assert agg.count == 40
    for a in AGGREGATORS:
        offline = smoothed(z, a, decay=0.9, window=7)
        np.testing.assert_allclose(pushed[a], offline, rtol=1e-12, atol=1e-12)
        assert agg.peak[a] == pytest.approx(offline.max())
        assert agg.last[a] == pytest.approx(offline[-1])
    assert len(agg.recent) == 7  # bounded state: the window, not the history


def test_first_crossing() -> None:
    assert first_crossing([0.1, 0.5, 0.9, 0.2], 0.5) == 2
    assert first_crossing([0.1, 0.2], 0.5) is None
    assert first_crossing([0.9], None) is None  # no certified threshold: never stop


def _benign_peaks(rng: np.random.Generator, n: int) -> np.ndarray:
    """Synthetic benign responses: noisy token logits of random length, peak of their EMA."""
    return np.asarray([smoothed(rng.normal(-2.0, 1.5, size=rng.integers(5, 80)), "ema", decay=0.8, window=8).max()
                       for _ in range(n)])


def test_stream_calibration_bounds_the_benign_stop_rate() -> None:
    """LTT on benign peaks: the realised stop rate on fresh benign streams exceeds α in at most ~δ of draws."""
    alpha, delta, reps = 0.1, 0.1, 200
    rng = np.random.default_rng(0)
    population = _benign_peaks(rng, 20000)
    exceed = certified = 0
    rates: list[float] = []
    for rep in range(reps):
        sample = rng.choice(population, size=300, replace=False)
        cal = calibrate_stop(sample, alpha=alpha, delta=delta, seed=rep, name="peak")
        if cal.threshold is None:
            continue
        certified += 1
        exceed += float(np.mean(population > cal.threshold)) > alpha
        rates.append(float(np.mean(population > cal.threshold)))
    assert certified >= reps * 0.9
    assert exceed / certified <= delta + 0.05  # binomial slack over 200 repetitions
    assert np.median(rates) > alpha / 3  # and not by stopping nothing


def test_stop_calibration_certifies_under_a_heavy_upper_tail() -> None:
    """Peaks above every opt-split value must not end the test at its first threshold."""
    rng = np.random.default_rng(3)
    peaks = np.concatenate([rng.normal(size=300), rng.pareto(1.0, size=12) + 6.0])
    cal = calibrate_stop(peaks, alpha=0.1, delta=0.1, seed=0, name="peak")
    assert cal.threshold is not None and cal.certified > 0
    assert float(np.mean(peaks > cal.threshold)) <= 0.1


def test_responses_are_not_class_balanced_on_the_prompt_label(tmp_path, datasets_dir) -> None:  # type: ignore[no-untyped-def]
    """The broad default balances two-class sources on the record label; for responses that is the prompt's
    (XSTest's completions: half the prompts unsafe, 6 % of replies harmful), so the token probe's data opts out."""
    from probes.config import Settings
    from probes.fitting.token_train import load_responses, response_label

    s = Settings(cache_dir=tmp_path)
    assert s.data.class_balance_per_source
    dataset, _ = load_responses(s, [datasets_dir / "xstest_completions.conversations.jsonl"], max_per_source=None)
    assert len(dataset.records) == 1935  # every reply kept, none dropped to balance prompt labels
    assert sum(response_label(r) for r in dataset.records) == 119
