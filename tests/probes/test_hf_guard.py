"""Mechanics of the local guard with the real offline SmolLM2 (too small to be accurate: not checked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from probes.config import HFGuardConfig
from probes.conversation import conversation, single_turn
from probes.errors import ConfigError
from probes.experts.base import Expert
from probes.experts.hf_guard import HFGuardExpert

# A short template keeps the CPU forwards cheap; with SmolLM2's system prompt it takes ~45 tokens.
TEMPLATE = "Is this conversation unsafe?\n{conversation}\nAnswer 'safe' or 'unsafe'."
MAX_LENGTH = 72

CONVERSATIONS = [
    single_turn("How do I pick a lock?"),
    single_turn("Write a haiku about the rain in spring, please."),
    conversation(
        [("user", "hi"), ("assistant", "Hello! How can I help you today?"), ("user", "tell me a joke")]
    ),
]


@pytest.fixture(scope="module")
def guard(cache_dir: Path) -> HFGuardExpert:
    # fp32: batch and single forwards then agree to float rounding, not bf16 rounding
    config = HFGuardConfig(
        model="smollm2-135m-instruct",
        prompt_template=TEMPLATE,
        dtype="fp32",
        max_length=MAX_LENGTH,
        batch_size=2,
    )
    return HFGuardExpert(config, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def batched(guard: HFGuardExpert) -> np.ndarray:
    return guard.score(CONVERSATIONS)


def test_scores_are_probabilities_and_deterministic(guard: HFGuardExpert, batched: np.ndarray) -> None:
    assert isinstance(guard, Expert)
    assert guard.name.startswith("hf-guard:smollm2-135m-instruct:") and len(guard.name.split(":")[-1]) == 12
    assert guard.parameters_per_token() > 100_000_000
    assert batched.shape == (3,) and batched.dtype == np.float64
    assert np.all((batched > 0) & (batched < 1))
    np.testing.assert_array_equal(guard.score(CONVERSATIONS), batched)
    assert guard.score([]).shape == (0,)


def test_batch_and_single_agree(guard: HFGuardExpert, batched: np.ndarray) -> None:
    # batch_size=2 over 3 conversations of different lengths: the two shortest share a left-padded batch
    lengths = [len(guard.prompt_ids(c)) for c in CONVERSATIONS]
    assert len(set(lengths)) == 3
    alone = np.array([guard.score([c])[0] for c in CONVERSATIONS])
    np.testing.assert_allclose(batched, alone, atol=1e-4)


def test_prompt_goes_through_the_chat_template_and_ends_at_the_answer(guard: HFGuardExpert) -> None:
    text = guard.tokenizer.decode(guard.prompt_ids(CONVERSATIONS[0]))
    assert text.count("<|im_start|>") == 3  # system, user, assistant: no doubled BOS
    assert "User: How do I pick a lock?" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_long_conversation_is_cut_from_the_left_keeping_the_instructions(guard: HFGuardExpert) -> None:
    tail = "and that is all. " * 4 + "Now tell me how to pick a lock."
    long_a = single_turn("alpha " * 800 + tail)
    long_b = single_turn("beta gamma " * 600 + tail)
    ids = guard.prompt_ids(long_a)
    assert len(ids) == MAX_LENGTH
    text = guard.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and "Is this conversation unsafe?" in text
    assert "how to pick a lock." in text and text.endswith("<|im_start|>assistant\n")
    assert guard.prompt_ids(long_b) == ids  # only the (differing) oldest tokens were dropped
    scores = guard.score([long_a, long_b])
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)
    assert 0 < scores[0] < 1


def test_bad_configs_fail_early(cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match="same token"):
        HFGuardExpert(
            HFGuardConfig(unsafe_token="safe!", safe_token="safe", dtype="fp32"), cache_dir=cache_dir
        )
    with pytest.raises(ConfigError, match="no room"):
        HFGuardExpert(HFGuardConfig(max_length=32, dtype="fp32"), cache_dir=cache_dir)
    with pytest.raises(ConfigError, match="conversation"):
        HFGuardExpert(HFGuardConfig(prompt_template="no placeholder", dtype="fp32"), cache_dir=cache_dir)
