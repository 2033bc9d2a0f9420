from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from probes.activations.render import render_text
from probes.config import EncoderHeadConfig
from probes.conversation import Conversation, single_turn
from probes.data import read_file
from probes.errors import ExpertError
from probes.experts.base import Expert
from probes.experts.encoder_head import EncoderHeadExpert, _pad, train_encoder_head
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


@pytest.fixture(scope="module")
def minilm_expert(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, datasets_dir: Path) -> EncoderHeadExpert:
    """MiniLM fine-tuned (3 epochs, 200 texts) until it separates harmful requests from instructions."""
    private = tmp_path_factory.mktemp("expert-cache")
    config = EncoderHeadConfig(backbone="minilm-l6", max_length=64, epochs=3, batch_size=16, max_train=200,
                               learning_rate=1e-4, train_layers="all", dtype="fp32")
    share_models(private, cache_dir, config.backbone)
    records = read_file(datasets_dir / "harmbench.jsonl")[:100] + read_file(datasets_dir / "alpaca_benign.jsonl")[:100]
    return EncoderHeadExpert(train_encoder_head(config, records, cache_dir=private), dtype="fp32", max_windows=16)


def _tail_only(expert: EncoderHeadExpert, conversations: list[Conversation]) -> np.ndarray:
    """What the expert read before windows: the left-truncated input alone."""
    rows = [_tail_only_ids(expert, c) for c in conversations]
    with torch.inference_mode():
        logits = expert.model(**_pad(expert.tokenizer, rows)).logits.float()
        return torch.softmax(logits, dim=-1)[:, 1].numpy()


def test_windows_cover_head_to_tail_and_keep_the_trained_input_first(minilm_expert: EncoderHeadExpert) -> None:
    expert = minilm_expert
    short = single_turn("How do I bake bread?")
    long = single_turn(" ".join(f"w{i}" for i in range(2000)))
    rows, owners = expert.windows([short, long])
    assert owners.tolist() == [0] + [1] * (len(rows) - 1)
    assert rows[0] == expert.tokenizer(render_text(expert.tokenizer, short), truncation=True,
                                       max_length=expert.max_length)["input_ids"]
    long_rows = rows[1:]
    assert 2 <= len(long_rows) <= expert.max_windows and all(len(r) <= expert.max_length for r in long_rows)
    # First the left-truncated view the expert was trained on, last the head of the conversation.
    assert long_rows[0] == _tail_only_ids(expert, long)
    head = expert.tokenizer(render_text(expert.tokenizer, long), add_special_tokens=False)["input_ids"]
    assert long_rows[-1][1:9] == head[:8]


def _tail_only_ids(expert: EncoderHeadExpert, conversation: Conversation) -> list[int]:
    return list(expert.tokenizer(render_text(expert.tokenizer, conversation), truncation=True,
                                 max_length=expert.max_length)["input_ids"])


@pytest.mark.slow
def test_a_request_padded_with_filler_is_not_cleared(minilm_expert: EncoderHeadExpert, datasets_dir: Path) -> None:
    """Held-out harmful requests followed by ~2k tokens of benign instructions: the windowed expert scores them
    near the request alone; the tail it used to read alone scores them all as the filler."""
    expert = minilm_expert
    requests = [r.messages[-1].content for r in read_file(datasets_dir / "harmbench.jsonl")[150:160]]
    filler = " ".join(r.messages[-1].content for r in read_file(datasets_dir / "alpaca_benign.jsonl")[100:200])
    padded = [single_turn(q + "\n\n" + filler[:8000]) for q in requests]
    alone = expert.score([single_turn(q) for q in requests])
    windowed = expert.score(padded)
    tail = _tail_only(expert, padded)
    assert np.median(alone) > 0.7  # the expert does flag the requests on their own
    assert np.median(np.abs(windowed - alone)) < 0.1
    assert np.median(np.abs(tail - alone)) > 0.2
    assert np.all(windowed >= tail - 1e-6)  # the tail is one of the windows
