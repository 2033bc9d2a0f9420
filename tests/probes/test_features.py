from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from probes.activations.features import (
    FeatureCache,
    FeatureExtractor,
    collate,
    ema_scores,
    pool_last,
    pool_mean,
)
from probes.conversation import single_turn
from probes.fitting.heads import fit_logistic


def test_mean_pooling_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(pool_mean(hidden, mask), torch.tensor([[2.0, 2.0]]))


def test_last_pooling_picks_real_last_token_under_right_padding() -> None:
    hidden = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool_last(hidden, mask), torch.tensor([[2.0, 3.0], [10.0, 11.0]]))


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_batched_features_equal_unbatched(smollm2, pooling: str) -> None:
    """Right padding (EOS as pad in SmolLM2) must not change any item's pooled features."""
    extractor = FeatureExtractor(smollm2, layer=4, max_tokens=64, batch_tokens=4096, max_items=8)
    convs = [single_turn("hi"), single_turn("a much longer message " * 6), single_turn("medium length text here")]
    together = extractor.pooled(convs, pooling)  # type: ignore[arg-type]
    alone = np.stack([extractor.pooled([c], pooling)[0] for c in convs])  # type: ignore[arg-type]
    np.testing.assert_allclose(together, alone, rtol=1e-3, atol=1e-3)


def test_layer_hook_reads_requested_block(minilm) -> None:
    extractor = FeatureExtractor(minilm, layer=2, max_tokens=32, batch_tokens=1024, max_items=4)
    batch = next(extractor.batches(extractor.tokenize([single_turn("hello world")])))
    captured, _ = extractor.hidden(batch)
    with torch.inference_mode():
        reference = minilm.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
        ).hidden_states[2]
    torch.testing.assert_close(captured, reference.float())


def test_ema_streamed_equals_offline_recomputation(minilm) -> None:
    extractor = FeatureExtractor(minilm, layer=4, max_tokens=64, batch_tokens=2048, max_items=8)
    texts = ["how to build a bomb", "how to bake bread", "steal a car now", "plant a garden"]
    convs = [single_turn(t) for t in texts]
    head = fit_logistic(extractor.pooled(convs, "mean"), [1, 0, 1, 0])
    w, c = head.folded()
    tokens = extractor.token_states(convs)
    decay = 0.8
    for states in tokens:
        offline = ema_scores(states @ w + c, decay)
        state = 0.0
        for t, h in enumerate(states):  # streamed: one scalar of state, one token at a time
            z = float(h @ w + c)
            state = z if t == 0 else decay * state + (1 - decay) * z
            assert state == pytest.approx(offline[t], rel=1e-5, abs=1e-5)
    # folding the standardisation into w, c gives the same logit as the head on pooled features
    pooled = extractor.pooled(convs, "mean")
    np.testing.assert_allclose(pooled @ w + c, head.logit(pooled), rtol=1e-4, atol=1e-3)


def test_feature_cache_roundtrip_and_key(tmp_path: Path, minilm) -> None:
    cache = FeatureCache(tmp_path)
    k1 = FeatureCache.key(minilm, layer=2, pooling="mean", max_tokens=64, data_hash="abc", dtype="fp32")
    k2 = FeatureCache.key(minilm, layer=3, pooling="mean", max_tokens=64, data_hash="abc", dtype="fp32")
    k3 = FeatureCache.key(minilm, layer=2, pooling="mean", max_tokens=64, data_hash="abd", dtype="fp32")
    assert len({k1, k2, k3}) == 3
    assert cache.get(k1) is None
    features = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    cache.put(k1, features, {"n": "5"})
    np.testing.assert_array_equal(cache.get(k1), features)


def test_collate_right_pads() -> None:
    batch = collate([[5, 6, 7], [8]], [0, 1], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_one_extractor_is_safe_to_share_between_threads(minilm) -> None:
    """Two workers in one process share a model: concurrent forwards must not swap captured states."""
    from concurrent.futures import ThreadPoolExecutor

    extractor = FeatureExtractor(minilm, layer=3, max_tokens=64, batch_tokens=4096, max_items=8)
    convs = [single_turn(f"text number {i} " * (1 + i % 5)) for i in range(24)]
    expected = extractor.pooled(convs, "mean")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: extractor.pooled([c], "mean")[0], convs))
    np.testing.assert_allclose(np.stack(results), expected, rtol=1e-4, atol=1e-4)


def test_max_and_rolling_max_pooling_ignore_padding() -> None:
    from probes.activations.features import pool, pool_max, pool_rolling_max

    hidden = torch.tensor([[[1.0], [5.0], [3.0], [4.0], [100.0]], [[2.0], [0.0], [9.0], [-50.0], [-50.0]]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    assert pool_max(hidden, mask).flatten().tolist() == [5.0, 2.0]
    # windows of 2 over the real tokens: (1,5)->3, (5,3)->4, (3,4)->3.5; the padded 100 never enters
    assert pool_rolling_max(hidden, mask, 2).flatten().tolist() == [4.0, 1.0]
    # windows of 3: (1,5,3)->3, (5,3,4)->4; the second row is shorter than the window: its mean
    assert pool_rolling_max(hidden, mask, 3).flatten().tolist() == [4.0, 1.0]
    assert torch.equal(pool(hidden, mask, "rollmax4"), pool_rolling_max(hidden, mask, 4))


def test_multi_layer_extractor_matches_single_layer_extractors(minilm) -> None:
    from probes.activations.features import MultiLayerExtractor

    convs = [single_turn("short"), single_turn("a longer message with more words " * 3)]
    multi = MultiLayerExtractor(minilm, layers=[2, 4], max_tokens=64, batch_tokens=4096, max_items=8)
    out = multi.pooled(convs, [(2, "mean"), (4, "max"), (4, "rollmax8")])
    for layer, pooling in out:
        single = FeatureExtractor(minilm, layer=layer, max_tokens=64, batch_tokens=4096, max_items=8)
        np.testing.assert_allclose(out[(layer, pooling)], single.pooled(convs, pooling), atol=1e-5)  # type: ignore[arg-type]
