from __future__ import annotations

import numpy as np
import pytest

from probes.heads.inference import LinearHead, sigmoid
from probes.heads.token_probe import rolling_means
from probes.heads.token_scorer import TokenScorer, max_rolling_mean


def _brute(z: np.ndarray, k: int) -> float:
    return max(float(np.mean(z[max(0, t - k + 1): t + 1])) for t in range(len(z)))


def test_max_rolling_mean_matches_the_definition() -> None:
    rng = np.random.default_rng(1)
    for n, k in ((1, 4), (3, 4), (10, 4), (50, 7), (50, 1)):
        z = rng.normal(size=n)
        assert max_rolling_mean(z, k) == pytest.approx(_brute(z, k))
    assert max_rolling_mean([], 4) == float("-inf")


def _scorer(dim: int = 6, window: int = 4) -> tuple[LinearHead, TokenScorer]:
    rng = np.random.default_rng(2)
    head = LinearHead(mean=rng.normal(size=dim).astype(np.float32), scale=rng.uniform(0.5, 2, dim).astype(np.float32),
                      weight=rng.normal(size=dim).astype(np.float32), bias=-0.3)
    return head, TokenScorer.from_head(head, window)


def test_scorer_is_the_heads_token_logits_then_max_of_rolling_means() -> None:
    head, scorer = _scorer()
    states = np.random.default_rng(3).normal(size=(12, 6)).astype(np.float32)
    z = head.logit(states)
    np.testing.assert_allclose(scorer.token_logits(states), z, rtol=1e-5, atol=1e-5)
    assert scorer.logit(states) == pytest.approx(float(rolling_means(z, 4).max()), abs=1e-5)
    np.testing.assert_allclose(scorer.proba([states, states[:3]]),
                               sigmoid(np.asarray([scorer.logit(states), scorer.logit(states[:3])])))
    with pytest.raises(ValueError):
        TokenScorer.from_head(head, 0)


def test_padding_does_not_dilute_a_short_span_where_the_mean_does() -> None:
    dim = 6
    w = np.zeros(dim, dtype=np.float32)
    w[0] = 1.0
    head = LinearHead(mean=np.zeros(dim, np.float32), scale=np.ones(dim, np.float32), weight=w, bias=0.0)
    scorer = TokenScorer.from_head(head, window=4)
    harmful = np.zeros((6, dim), dtype=np.float32)
    harmful[:, 0] = 5.0
    filler = np.full((3000, dim), -1.0, dtype=np.float32)
    alone = scorer.logit(harmful)
    for padded in (np.concatenate([filler, harmful]), np.concatenate([harmful, filler]),
                   np.concatenate([filler[:1500], harmful, filler[1500:]])):
        assert scorer.logit(padded) == pytest.approx(alone)
        assert head.logit(padded.mean(axis=0, keepdims=True))[0] < 0 < alone  # the mean is swamped


def test_skip_drops_the_shared_prefix_so_it_sets_no_floor() -> None:
    dim = 4
    w = np.zeros(dim, dtype=np.float32)
    w[0] = 1.0
    head = LinearHead(mean=np.zeros(dim, np.float32), scale=np.ones(dim, np.float32), weight=w, bias=0.0)
    prefix = np.zeros((5, dim), dtype=np.float32)
    prefix[:, 0] = 3.0  # a template prefix that scores high in every conversation
    low, high = np.zeros((8, dim), np.float32), np.zeros((8, dim), np.float32)
    low[:, 0], high[:, 0] = -2.0, 1.0
    plain = TokenScorer.from_head(head, window=4)
    assert plain.logit(np.concatenate([prefix, low])) == plain.logit(np.concatenate([prefix, high]))
    skipping = TokenScorer.from_head(head, window=4, skip=5)
    assert skipping.logit(np.concatenate([prefix, low])) == pytest.approx(-2.0)
    assert skipping.logit(np.concatenate([prefix, high])) == pytest.approx(1.0)
    assert skipping.logit(prefix[:3]) == pytest.approx(3.0)  # nothing after the prefix: read what there is
    with pytest.raises(ValueError):
        TokenScorer.from_head(head, window=4, skip=-1)
