from __future__ import annotations

from pathlib import Path

import pytest

from probes.config import ExpertConfig, OpenAIExpertConfig, Settings
from probes.errors import ConfigError
from probes.experts.base import Expert
from probes.experts.factory import build_expert


def test_encoder_head_needs_a_trained_directory() -> None:
    with pytest.raises(ConfigError, match="expert.path"):
        build_expert(Settings())


def test_openai_compatible_from_config() -> None:
    s = Settings(expert=ExpertConfig(backend="openai-compatible",
                                     openai=OpenAIExpertConfig(api="chat", params_per_token=8_000_000_000)))
    expert = build_expert(s)
    assert isinstance(expert, Expert)
    assert expert.name.startswith("openai-compatible:") and expert.parameters_per_token() == 8_000_000_000


def test_hf_guard_from_config(cache_dir: Path) -> None:
    expert = build_expert(Settings(cache_dir=cache_dir, expert=ExpertConfig(backend="hf-guard")))
    assert isinstance(expert, Expert) and expert.name.startswith("hf-guard:")
