from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from probes.config import EncoderHeadConfig
from probes.conversation import single_turn
from probes.data import read_file
from probes.errors import ExpertError
from probes.experts.base import Expert
from probes.experts.encoder_head import EncoderHeadExpert, train_encoder_head
from tests.conftest import share_models


def _records(datasets_dir: Path, n: int) -> list:
    pos = [r for r in read_file(datasets_dir / "harmbench.jsonl")][: n // 2]
    neg = [r for r in read_file(datasets_dir / "alpaca_benign.jsonl")][: n // 2]
    return pos + neg


@pytest.mark.slow
def test_fine_tunes_mpnet_and_reuses_the_cache(tmp_path: Path, cache_dir: Path, datasets_dir: Path) -> None:
    # Models come from the shared cache; the fine-tuned expert goes to a private one.
    config = EncoderHeadConfig(max_length=48, epochs=2, batch_size=8, max_train=48, learning_rate=5e-5,
                               train_layers=2)
    share_models(tmp_path, cache_dir, config.backbone)
    records = _records(datasets_dir, 64)
    ticks: list[int] = []
    path = train_encoder_head(config, records, cache_dir=tmp_path, progress=ticks.append)
    assert sum(ticks) > 0 and (path / "model.safetensors").is_file() and (path / "training.json").is_file()
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pkl"))
    again = train_encoder_head(config, records, cache_dir=tmp_path, progress=ticks.append)
    assert again == path  # reused, not retrained
    expert = EncoderHeadExpert(path, dtype="fp32")
    assert isinstance(expert, Expert)
    assert expert.parameters_per_token() > 100_000_000
    held_out_pos = [r.messages for r in read_file(datasets_dir / "strongreject.jsonl")[:8]]
    held_out_neg = [r.messages for r in read_file(datasets_dir / "alpaca_benign.jsonl")[-8:]]
    scores = expert.score(held_out_pos + held_out_neg)
    assert scores.shape == (16,) and np.all((scores >= 0) & (scores <= 1))
    # even 2 epochs on 48 texts separate blatant requests from benign instructions
    assert scores[:8].mean() > scores[8:].mean()
    one = expert.score([held_out_pos[0]])
    assert one[0] == pytest.approx(scores[0], abs=1e-5)


def test_trains_on_small_encoder(tmp_path: Path, cache_dir: Path, datasets_dir: Path) -> None:
    config = EncoderHeadConfig(backbone="minilm-l6", max_length=32, epochs=1, batch_size=8, max_train=16,
                               dtype="fp32")
    path = train_encoder_head(config, _records(datasets_dir, 24), cache_dir=tmp_path)
    scores = EncoderHeadExpert(path, dtype="fp32").score([single_turn("hello"), single_turn("x " * 400)])
    assert scores.shape == (2,)


def test_single_class_and_not_an_expert(tmp_path: Path, datasets_dir: Path) -> None:
    pos = read_file(datasets_dir / "harmbench.jsonl")[:10]
    with pytest.raises(ExpertError, match="both classes"):
        train_encoder_head(EncoderHeadConfig(backbone="minilm-l6"), pos, cache_dir=tmp_path)
    with pytest.raises(ExpertError, match="not a trained encoder-head expert"):
        EncoderHeadExpert(tmp_path)
