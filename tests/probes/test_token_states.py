from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from probes.activations.features import FeatureExtractor
from probes.activations.models import LoadedModel
from probes.activations.token_states import (
    TokenStateStore,
    record_token_states,
    template_prefix,
    token_namespace,
)
from probes.conversation import single_turn
from probes.data import Record


def test_store_roundtrip_keeps_lengths_and_computes_only_missing(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {f"{i:032x}": rng.normal(size=(3 + 5 * i, 8)).astype(np.float32) for i in range(4)}
    keys = list(arrays)
    store = TokenStateStore(tmp_path, "ns")
    store.put(keys[:2], [arrays[k] for k in keys[:2]])
    calls: list[list[int]] = []

    def compute(rows: list[int]) -> list[np.ndarray]:
        calls.append(rows)
        return [arrays[keys[i]] for i in rows]

    # a fresh store reads the chunk from disk; only keys 2 and 3 (asked twice) are computed, once each
    again = TokenStateStore(tmp_path, "ns")
    states, computed = again.get_or_compute([*keys, keys[3]], compute, chunk=1)
    assert computed == 2 and calls == [[2], [3]]
    for key, got in zip([*keys, keys[3]], states, strict=True):
        assert got.dtype == np.float16 and got.shape == arrays[key].shape
        np.testing.assert_allclose(got, arrays[key], atol=2e-3, rtol=1e-3)
    assert len(TokenStateStore(tmp_path, "ns")) == 4
    assert TokenStateStore(tmp_path, "other").missing(keys) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="one array per key"):
        again.put(keys[:2], [arrays[keys[0]]])


def test_store_refuses_states_float16_cannot_hold(tmp_path: Path) -> None:
    """Block inputs of SmolLM2 reach ~25,000; a wider state would be stored as inf, so it is refused."""
    store = TokenStateStore(tmp_path, "ns")
    store.put(["a" * 32], [np.full((2, 4), 25_000.0, dtype=np.float32)])
    with pytest.raises(ValueError, match="float16"):
        store.put(["k" * 32], [np.full((2, 4), 1e5, dtype=np.float32)])
    assert store.missing(["a" * 32, "k" * 32]) == [1]


def test_a_damaged_chunk_is_recomputed_not_fatal(tmp_path: Path) -> None:
    store = TokenStateStore(tmp_path, "ns")
    store.put(["a" * 32], [np.ones((2, 4), dtype=np.float32)])
    chunk = next(store.dir.glob("*.safetensors"))
    chunk.write_bytes(chunk.read_bytes()[:20])
    assert TokenStateStore(tmp_path, "ns").missing(["a" * 32]) == [0]


def test_record_token_states_are_the_models_states_and_cached(tmp_path: Path, smollm2: LoadedModel) -> None:
    extractor = FeatureExtractor(smollm2, layer=4, max_tokens=24, batch_tokens=512, max_items=8)
    conversations = [single_turn(t) for t in ("How do I bake bread?", "Tell me a joke about cats, please.",
                                              " ".join(["word"] * 40))]
    keys = [Record(id=str(i), messages=c, label=0, source="s", file="f").content_key()
            for i, c in enumerate(conversations)]
    states, computed = record_token_states(tmp_path, extractor, conversations, keys)
    assert computed == 3
    direct = extractor.token_states(conversations)
    for got, want in zip(states, direct, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-2)
    assert states[2].shape[0] == 24  # the max-token bound holds
    again, computed = record_token_states(tmp_path, extractor, conversations[::-1], keys[::-1])
    assert computed == 0
    np.testing.assert_array_equal(again[0], states[2])
    namespace, meta = token_namespace(smollm2, layer=4, max_tokens=24)
    assert meta["layer"] == "4" and meta["max_tokens"] == "24" and meta["stored"] == "float16"
    assert namespace != token_namespace(smollm2, layer=4, max_tokens=32)[0]
    assert namespace != token_namespace(smollm2, layer=5, max_tokens=24)[0]


def test_template_prefix_is_the_shared_system_prompt_with_the_same_states(smollm2: LoadedModel) -> None:
    extractor = FeatureExtractor(smollm2, layer=4, max_tokens=64, batch_tokens=512, max_items=8)
    prefix = template_prefix(extractor)
    ids = extractor.tokenize([single_turn("Explain tides."), single_turn("Write a poem")])
    assert 0 < prefix < min(len(i) for i in ids)
    assert ids[0][:prefix] == ids[1][:prefix] and ids[0][prefix] != ids[1][prefix]
    assert smollm2.tokenizer.decode(ids[0][:prefix]).rstrip().endswith("user")
    a, b = extractor.token_states([single_turn("Explain tides."), single_turn("Write a poem")])
    np.testing.assert_allclose(a[:prefix], b[:prefix], atol=1e-4)  # causal: the same states in every record
