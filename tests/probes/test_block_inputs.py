from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from probes.activations.block_inputs import BlockInputStore, block_input_namespace, record_block_inputs
from probes.activations.features import FeatureExtractor
from probes.activations.models import LoadedModel
from probes.conversation import single_turn
from probes.data import Record


def test_store_keeps_variable_length_states_per_record_across_instances(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    states = [rng.normal(size=(n, 8)).astype(np.float32) * 100 for n in (3, 0, 7)]
    keys = ["a" * 40, "b" * 40, "c" * 40]
    BlockInputStore(tmp_path, "ns").put(keys, states)
    fresh = BlockInputStore(tmp_path, "ns")
    assert len(fresh) == 3 and fresh.missing([*keys, "d" * 40]) == [3]
    got = fresh.get([keys[2], keys[0], keys[1]])
    assert [g.dtype for g in got] == [np.float16] * 3
    assert [g.shape for g in got] == [(7, 8), (3, 8), (0, 8)]
    np.testing.assert_allclose(got[0], states[2], rtol=1e-3, atol=0.06)
    with pytest.raises(KeyError):
        fresh.get(["d" * 40])


def test_store_refuses_states_float16_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="float16"):
        BlockInputStore(tmp_path, "ns").put(["k" * 32], [np.full((2, 4), 1e5, dtype=np.float32)])
    with pytest.raises(ValueError, match="one state array per key"):
        BlockInputStore(tmp_path, "ns").put(["k" * 32], [])


def _records() -> list[Record]:
    texts = ["How do I bake bread?", "Write a poem about the sea at night, please.", "How do I bake bread?"]
    return [Record(id=str(i), file="t.jsonl", source="t", label=0, messages=single_turn(t))
            for i, t in enumerate(texts)]


def test_cached_inputs_are_the_states_leaving_the_block_below(tmp_path: Path, smollm2: LoadedModel) -> None:
    records = _records()
    convs = [r.messages for r in records]
    keys = [r.content_key() for r in records]
    states, computed = record_block_inputs(tmp_path, smollm2, convs, keys, block=4, max_tokens=12)
    assert computed == 2  # the repeated record runs once
    expected = FeatureExtractor(smollm2, layer=3, max_tokens=12, batch_tokens=4096, max_items=8).token_states(convs)
    for got, want in zip(states, expected, strict=True):
        assert got.shape == want.shape and len(got) <= 12
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-2)
    again, computed = record_block_inputs(tmp_path, smollm2, convs, keys, block=4, max_tokens=12)
    assert computed == 0
    np.testing.assert_array_equal(again[1], states[1])
    # another block or bound is another namespace (never served from this one)
    assert block_input_namespace(smollm2, block=4, max_tokens=12)[0] != block_input_namespace(
        smollm2, block=5, max_tokens=12)[0]
    assert block_input_namespace(smollm2, block=4, max_tokens=12)[0] != block_input_namespace(
        smollm2, block=4, max_tokens=16)[0]
    with pytest.raises(ValueError, match="block 8"):
        record_block_inputs(tmp_path, smollm2, convs, keys, block=8, max_tokens=12)
