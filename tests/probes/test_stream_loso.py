"""Leave-source-out stop rule: the fold on synthetic token states (a fake read), the sampler on the real files.

The end-to-end run on SmolLM2 and real responses is in tests/test_cli_stream.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from probes.config import Settings, StreamConfig
from probes.conversation import Message
from probes.data import Record
from probes.errors import DataError
from probes.evaluation.stream_loso import ReadResponse, Smoothing, hold_out, own_cut_recall, sample_sources
from probes.fitting.token_train import response_label

DIM = 8


def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=tmp_path, stream=StreamConfig(max_response_tokens=16, window=4, alpha=0.1, delta=0.1,
                                                            train_tokens_per_response=16, warmup_tokens=2))


def reads(source: str, direction: int, n: int, rng: np.random.Generator, strength: float = 4.0,
          tokens: int = 24) -> list[ReadResponse]:
    """n harmful responses whose tokens lean along ``direction`` from their 5th token on, n benign ones."""
    out = []
    for i in range(2 * n):
        label = int(i < n)
        states = rng.normal(size=(tokens, DIM))
        if label:
            states[4:, direction] += strength
        record = Record(id=f"{source}-{i}", source=source, label=label,
                        messages=(Message("user", f"{source} question {i}"), Message("assistant", f"answer {i}")),
                        extras={"response_label": label})
        out.append(ReadResponse(record, label, states.astype(np.float16), cut_at_bound=i % 10 == 0))
    return out


def test_a_held_out_source_is_stopped_with_a_cut_certified_on_the_others(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = {"a": reads("a", 0, 100, rng), "b": reads("b", 0, 100, rng), "c": reads("c", 0, 60, rng)}
    rows = hold_out(settings(tmp_path), "c", data)
    assert [r["method"] for r in rows] == ["token ema λ=0.9", "token rolling_max k=4"]
    for row in rows:
        assert row["held_out"] == "c" and row["n"] == 120 and row["harmful"] == 60 and row["cut_at_read_bound"] == 12
        assert row["certified"] and row["budget"] == 0.1
        # fitted only on a and b (their fit split, ~70 %), calibrated on the rest of their benign responses
        assert 0.6 * 400 < row["n_fit"] < 0.8 * 400 and 0.2 * 200 < row["n_benign_calibration"] < 0.4 * 200
        assert row["harmful_stopped"] > 0.9 and row["benign_stop_rate"] <= 0.15
        assert 4 / 24 < row["median_share_seen_at_stop"] < 0.5  # the signal starts at the 5th token
        assert row["stopped_at_own_cut"] > 0.9


def test_the_own_cut_oracle_is_the_held_out_benign_quantile() -> None:
    y = np.asarray([0] * 100 + [1] * 4, dtype=np.int64)
    peaks = np.concatenate([np.arange(100.0), [90.0, 95.5, 99.5, 200.0]])
    assert own_cut_recall(y, peaks, 0.05) == 0.75  # the cut is the 95th percentile of 0..99: 94.05
    assert own_cut_recall(y, peaks, 0.01) == 0.5  # 98.01
    assert np.isnan(own_cut_recall(y[:100], peaks[:100], 0.05))


def test_the_held_out_source_never_teaches_the_head(tmp_path: Path) -> None:
    """Harm that only the held-out source shows (another direction) is not learnt: had its responses leaked into
    the fit, the head would find that direction and stop them."""
    rng = np.random.default_rng(1)
    data = {"a": reads("a", 0, 100, rng), "b": reads("b", 0, 100, rng), "c": reads("c", 5, 60, rng)}
    for row in hold_out(settings(tmp_path), "c", data):
        assert row["harmful_stopped"] < 0.3
        assert row["auroc_peak"] < 0.7


def test_sources_are_sampled_per_response_class_and_one_class_sources_dropped(tmp_path: Path,
                                                                              datasets_dir: Path) -> None:
    s = Settings(cache_dir=tmp_path)
    files = ["xstest_completions.conversations.jsonl", "refusal_direction_completions.conversations.jsonl",
             "harmbench.jsonl"]
    sampled = sample_sources(s, files, 40)
    # harmbench has no model responses (its last turn is the user's): nothing to stream
    assert set(sampled) == {"xstest_completions", "refusal_direction_completions"}
    for group in sampled.values():
        labels = [response_label(r) for r in group]
        assert labels.count(0) == labels.count(1) == 20
        assert all(r.messages[-1].role == "assistant" for r in group)
    # xstest_completions' conversation label is the prompt's: sampling on it would not balance the responses
    assert any(r.label != response_label(r) for r in sampled["xstest_completions"])
    assert sample_sources(s, files, 40) == sampled  # seeded

    with pytest.raises(DataError, match="two response sources"):
        sample_sources(s, ["xstest_completions.conversations.jsonl"], 40)


def test_smoothings_compared_on_one_fold_share_the_head_and_calibrate_their_own_cut(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    data = {s: reads(s, 0, 100, rng, strength=1.0, tokens=96) for s in "abc"}
    smoothings = Smoothing.parse("ema:0.5, rolling_max:1,rolling_max:16")
    rows = hold_out(settings(tmp_path), "c", data, smoothings)
    assert [r["method"] for r in rows] == ["token ema λ=0.5", "token rolling_max k=1", "token rolling_max k=16"]
    assert len({r["threshold"] for r in rows}) == 3 and all(r["certified"] for r in rows)
    # a weak lean, 92 tokens long: an EMA pools enough tokens to see it, one token at a time (k=1) misses more
    assert rows[0]["harmful_stopped"] > 0.9 > rows[1]["harmful_stopped"]


@pytest.mark.parametrize("text", ["", "ema", "ema:1.5", "rolling_max:0", "rolling_max:2.5", "max:4", "ema:x"])
def test_a_malformed_smoothing_is_a_clear_error(text: str) -> None:
    with pytest.raises(ValueError):
        Smoothing.parse(text)
