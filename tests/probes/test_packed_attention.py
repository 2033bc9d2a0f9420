from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from probes.activations import packed_attention
from probes.activations.features import FeatureExtractor, collate


@pytest.fixture(scope="module")
def extractor(smollm2) -> FeatureExtractor:
    return FeatureExtractor(smollm2, layer=6, max_tokens=256, batch_tokens=4096, max_items=8)


def test_the_installed_attention_leaves_unpacked_passes_as_sdpa_runs_them(extractor) -> None:
    """Installing only adds a path: a padded batch gives the same states, bit for bit, as under plain SDPA."""
    model = extractor.loaded.model
    assert extractor.packs_cached_batches()
    assert model.config._attn_implementation == packed_attention.NAME
    tok = extractor.loaded.tokenizer
    ids = [tok("How do I bake bread at home?")["input_ids"], tok("Hi")["input_ids"]]
    batch = collate(ids, [0, 1], extractor.pad_id)
    installed, _ = extractor.hidden(batch)
    model.set_attn_implementation("sdpa")
    try:
        plain, _ = extractor.hidden(batch)
    finally:
        assert packed_attention.install(model)
    torch.testing.assert_close(installed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("implementation", ["eager", "flash_attention_2", None])
def test_models_whose_attention_is_not_sdpa_are_left_alone(implementation) -> None:
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=implementation))
    assert not packed_attention.install(model)
    assert model.config._attn_implementation == implementation


def test_sliding_window_models_are_left_alone() -> None:
    """Packed sequences attend to all of their keys: a model with a sliding window keeps the padded batches."""
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa", sliding_window=4096))
    assert not packed_attention.install(model)
    assert model.config._attn_implementation == "sdpa"


def test_a_model_that_refuses_the_switch_keeps_padded_batches() -> None:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not supported")

    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"), set_attn_implementation=refuse)
    assert not packed_attention.install(model)
    assert model.config._attn_implementation == "sdpa"


def test_a_forward_that_does_not_run_the_packed_attention_falls_back_to_padding(extractor, monkeypatch) -> None:
    """A model whose forward drops the ``packed`` argument would mix the sequences: detected, padded instead."""
    tok = extractor.loaded.tokenizer
    seqs = [tok("How do I bake bread at home?")["input_ids"], tok("Hi there, friend")["input_ids"]]
    expected = [extractor.hidden_cached(s)[0] for s in seqs]
    model = extractor.loaded.model
    real_forward = model.forward

    def forgetful(*args, packed=None, cache=None, **kwargs):  # type: ignore[no-untyped-def]
        return real_forward(*args, cache=cache, **kwargs)

    monkeypatch.setattr(model, "forward", forgetful)
    monkeypatch.setattr(extractor, "_packed", True)
    got = extractor.hidden_cached_batch([(s, None) for s in seqs])
    assert extractor._packed is False
    for (states, _), want in zip(got, expected, strict=True):
        torch.testing.assert_close(states, want, rtol=1e-5, atol=2e-3)
