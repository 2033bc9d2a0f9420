from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from probes.fitting.token_scorer import (
    TokenScorerFit,
    fit_token_scorer,
    rolling_means_padded,
    soft_max_score,
    token_standardisation,
)
from probes.heads.token_probe import rolling_means

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_padded_rolling_means_and_soft_max_match_the_runtime() -> None:
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=n) for n in (1, 5, 9)]
    z = torch.zeros((3, 9), dtype=torch.float64)
    mask = torch.zeros((3, 9), dtype=torch.bool)
    for i, r in enumerate(rows):
        z[i, : len(r)] = torch.from_numpy(r)
        mask[i, : len(r)] = True
    z[0, 1:] = 100.0  # padding must not leak into any valid mean or the max
    means = rolling_means_padded(z, mask, 4)
    for i, r in enumerate(rows):
        np.testing.assert_allclose(means[i, : len(r)].numpy(), rolling_means(r, 4), atol=1e-12)
    hard = soft_max_score(means, mask, 1e-4).numpy()
    np.testing.assert_allclose(hard, [rolling_means(r, 4).max() for r in rows], atol=1e-6)
    soft = soft_max_score(means, mask, 1e3).numpy()
    np.testing.assert_allclose(soft, [rolling_means(r, 4).mean() for r in rows], atol=1e-2)


def test_standardisation_weighs_each_sequence_alike() -> None:
    short = np.zeros((2, 3), dtype=np.float32)
    long = np.full((1000, 3), 2.0, dtype=np.float32)
    mean, scale = token_standardisation([short, long])
    np.testing.assert_allclose(mean, 1.0)
    np.testing.assert_allclose(scale, 1.0)


def _sequences(n: int, seed: int, pad: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Benign noise; harmful sequences hide a 5-token span along one direction somewhere inside."""
    rng = np.random.default_rng(seed)
    direction = np.zeros(16, dtype=np.float32)
    direction[3] = 1.0
    seqs, labels = [], []
    for i in range(n):
        length = int(rng.integers(20, 60)) + pad
        x = rng.normal(size=(length, 16)).astype(np.float32)
        label = i % 2
        if label:
            start = int(rng.integers(0, length - 5))
            x[start : start + 5] += 3.0 * direction
        seqs.append(x)
        labels.append(label)
    return seqs, np.asarray(labels)


@pytest.mark.parametrize("objective", ["maxmean", "broadcast"])
def test_fitted_scorer_ranks_held_out_sequences_and_survives_padding(objective: str) -> None:
    train, y = _sequences(120, 0)
    _, scorer = fit_token_scorer(train, y, None, TokenScorerFit(objective=objective, window=4, epochs=100))  # type: ignore[arg-type]
    test, y_test = _sequences(100, 1)
    assert roc_auc_score(y_test, scorer.proba(test)) > 0.9
    padded, _ = _sequences(100, 1, pad=300)
    assert roc_auc_score(y_test, scorer.proba(padded)) > 0.85


def test_training_the_aggregate_beats_chance_on_weighted_rows_and_refuses_one_class() -> None:
    train, y = _sequences(80, 3)
    weights = np.where(y == 1, 3.0, 1.0)
    head, scorer = fit_token_scorer(train, y, weights, TokenScorerFit(window=4, epochs=80))
    assert head.weight.shape == (16,) and scorer.window == 4
    assert abs(head.weight[3] / head.scale[3]) == pytest.approx(np.abs(head.weight / head.scale).max())
    # a shared prefix that would otherwise top every sequence's max is skipped in training and scoring
    prefix = np.zeros((6, 16), dtype=np.float32)
    prefix[:, 3] = 10.0
    _, skipping = fit_token_scorer([np.concatenate([prefix, s]) for s in train], y, None,
                                   TokenScorerFit(window=4, epochs=80), skip=6)
    assert skipping.skip == 6
    test, y_test = _sequences(60, 4)
    assert roc_auc_score(y_test, skipping.proba([np.concatenate([prefix, s]) for s in test])) > 0.9
    with pytest.raises(ValueError, match="both classes"):
        fit_token_scorer(train, np.zeros(len(train)), None, TokenScorerFit())
    with pytest.raises(ValueError, match="one label"):
        fit_token_scorer(train, y[:-1], None, TokenScorerFit())
