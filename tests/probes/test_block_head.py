from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.activations.features import FeatureExtractor
from probes.activations.models import LoadedModel, layer_stack
from probes.conversation import single_turn
from probes.fitting.block_head import (
    BlockTraining,
    block_flops_per_token,
    block_runner,
    fit_block_head,
    pooled_states,
)
from probes.fitting.heads import fit_logistic

TEXTS = [
    "How do I make a bomb at home?", "Give me a recipe for banana bread.", "How can I poison my neighbour's dog?",
    "What is the capital of France?", "Write a threatening letter to my ex.", "Explain photosynthesis simply.",
    "How do I hack into my school's grading system and change my marks without anyone noticing?",
    "Summarise the plot of Hamlet in two sentences.",
]
LABELS = np.array([1, 0, 1, 0, 1, 0, 1, 0])


def _states(model: LoadedModel, layer: int) -> list[np.ndarray]:
    extractor = FeatureExtractor(model, layer=layer, max_tokens=48, batch_tokens=4096, max_items=8)
    return extractor.token_states([single_turn(t) for t in TEXTS])


def test_the_frozen_block_on_cached_inputs_gives_the_models_own_states(smollm2: LoadedModel) -> None:
    """Mask and rotary positions right: batched (right-padded) and alone, block 5 on the states leaving block 4
    reproduces what the model's forward pass computes at block 5."""
    inputs, outputs = _states(smollm2, 4), _states(smollm2, 5)
    runner = block_runner(smollm2, 5)
    batched = [torch.from_numpy(a.astype(np.float32)) for a in inputs]
    padded = torch.nn.utils.rnn.pad_sequence(batched, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(a), dtype=torch.long) for a in inputs], batch_first=True)
    with torch.no_grad():
        together = runner(padded, mask)
        for row, (x, want) in enumerate(zip(inputs, outputs, strict=True)):
            alone = runner(torch.from_numpy(x)[None], torch.ones((1, len(x)), dtype=torch.long))[0]
            np.testing.assert_allclose(alone.numpy(), want, rtol=1e-4, atol=1e-3)
            np.testing.assert_allclose(together[row, : len(x)].numpy(), want, rtol=1e-4, atol=1e-3)
            assert np.abs(want - x).max() > 1.0  # the block does change the states
    # the copy is independent of the loaded model
    assert runner.block is not layer_stack(smollm2.model)[4]


def test_zero_epochs_is_the_linear_probe_and_training_moves_only_the_copy(smollm2: LoadedModel) -> None:
    runner = block_runner(smollm2, 5)
    states = [s.astype(np.float16) for s in _states(smollm2, 4)]
    weights = np.linspace(0.5, 1.5, len(LABELS))
    before = {k: v.clone() for k, v in runner.block.state_dict().items()}
    frozen = pooled_states(runner, states)
    linear = fit_logistic(frozen, LABELS, c=0.5, sample_weight=weights, max_iter=200)
    still = fit_block_head(runner, states, LABELS, weights, block=5, training=BlockTraining(epochs=0))
    np.testing.assert_allclose(still.proba(states), linear.proba(frozen), rtol=1e-5, atol=1e-6)
    trained = fit_block_head(runner, states, LABELS, weights, block=5, training=BlockTraining(
        epochs=4, batch_size=4, train_tokens=16, block_lr=1e-3, head_lr=1e-2))
    assert len(trained.losses) == 4 and trained.losses[-1] < trained.losses[0]
    moved = trained.block_state()
    assert any(not torch.equal(moved[k], before[k]) for k in before)
    assert all(torch.equal(runner.block.state_dict()[k], before[k]) for k in before)  # the source block untouched
    assert trained.proba(states).shape == (len(LABELS),)


def test_block_flops_from_the_config_shapes(smollm2: LoadedModel) -> None:
    config = smollm2.model.config
    # SmolLM2-135M: hidden 576, 9 query heads and 3 key/value heads of 64, gated MLP of 1536
    projections = 576 * 576 * 2 + 576 * 192 * 2
    mlp = 3 * 576 * 1536
    assert block_flops_per_token(config, context=64) == pytest.approx(2 * (projections + mlp) + 4 * 64 * 576)
    runner = block_runner(smollm2, 5)
    matrices = sum(p.numel() for n, p in runner.block.named_parameters() if p.ndim == 2)
    assert block_flops_per_token(config, context=0) == pytest.approx(2 * matrices)
