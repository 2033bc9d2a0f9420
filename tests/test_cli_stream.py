"""The streamed-response commands end to end: SmolLM2 (two blocks), a few dozen real response rows."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from ctd_monitor.cli import app
from probes.heads.token_probe import TokenProbe
from probes.runtime.bundle import load_bundle


@pytest.fixture
def stream_config(tmp_path: Path, datasets_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CTD_CACHE_DIR", str(cache_dir))
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""
model: {{spec: smollm2-135m-instruct, dtype: fp32, max_tokens: 64}}
features: {{layer: 2, pooling: mean}}
data:
  datasets_dir: {datasets_dir}
  files: [harmbench.jsonl, alpaca_benign.jsonl]
  max_per_source: 30
  splits: {{seed: 0, probe_train: 0.5, dev: 0.0, calibration: 0.3, evaluation: 0.2}}
stream:
  max_per_source: 30
  max_response_tokens: 24
  train_tokens_per_response: 8
  alpha: 0.3
  delta: 0.2
"""
    )
    return path


def test_train_token_probe_evaluate_stream_and_bench(tmp_path: Path, stream_config: Path,
                                                     datasets_dir: Path) -> None:
    runner = CliRunner()
    base = ["--config", str(stream_config), "--no-progress"]
    bundle = tmp_path / "bundle"
    result = runner.invoke(app, [*base, "train-probe", "--out", str(bundle)])
    assert result.exit_code == 0, result.output

    result = runner.invoke(app, [*base, "train-token-probe", "--bundle", str(bundle)])
    assert result.exit_code == 0, result.output
    payload = orjson.loads(result.stdout)
    loaded = load_bundle(bundle)
    assert {"safety", "token", "stream_conv"} <= set(loaded.heads)
    assert "safety" in loaded.manifest.heads and "token" in loaded.manifest.heads
    assert loaded.manifest.stream is not None and loaded.manifest.stream.layer == 2
    probe = TokenProbe.from_bundle(loaded)
    assert probe.layer == 2 and probe.settings.max_response_tokens == 24
    cal = payload["thresholds"]
    assert cal["ema"]["alpha"] == 0.3 and cal["ema"]["n_cal"] == payload["n_benign_calibration"] > 0
    assert set(cal) == {"ema", "rolling_max", "stream_conv", "safety"}

    out = tmp_path / "stream"
    files = [datasets_dir / "refusal_direction_completions.conversations.jsonl",
             datasets_dir / "xstest_completions.conversations.jsonl"]
    result = runner.invoke(app, [*base, "evaluate-stream", "--bundle", str(bundle), "--max-per-source", "40",
                                 "--out", str(out), *[a for f in files for a in ("--data", str(f))]])
    assert result.exit_code == 0, result.output
    report = orjson.loads((out / "stream.json").read_bytes())
    methods = [r["method"] for r in report["rows"]]
    assert methods[:2] == ["token ema", "token rolling_max"] and len(methods) == 4
    assert report["n"] > 0 and all(r["n"] == report["n"] for r in report["rows"])
    for row in report["rows"]:
        assert 0.0 <= row["benign_stop_rate"] <= 1.0
        seen = row["median_share_seen_at_stop"]
        assert seen is None or 0.0 < seen <= 1.0  # NaN (nothing harmful stopped) is JSON null
    assert "| token ema |" in (out / "stream.md").read_text()

    # Each response source held out in turn: fitted and certified on the others, stopped on its own responses.
    held = [*files, datasets_dir / "do_not_answer_responses.conversations.jsonl"]
    result = runner.invoke(app, [*base, "evaluate-stream", "--bundle", str(bundle), "--leave-source-out",
                                 "--max-per-source", "40", "--read-tokens", "48", "--out", str(out),
                                 *[a for f in held for a in ("--data", str(f))]])
    assert result.exit_code == 0, result.output
    loso = orjson.loads((out / "loso.json").read_bytes())
    assert [(r["held_out"], r["method"]) for r in loso["rows"]] == [
        (g, m) for g in ("do_not_answer_responses", "refusal_direction_completions", "xstest_completions")
        for m in ("token ema λ=0.9", "token rolling_max k=16")]
    for row in loso["rows"]:
        assert row["harmful"] == 20 and row["n"] == 40  # 20 of each class per source
        assert row["n_fit"] < 80  # the two other sources' fit split only
        assert 0 <= row["cut_at_read_bound"] <= row["n"]
        assert 0.0 <= row["benign_stop_rate"] <= 1.0 and 0.0 <= row["harmful_stopped"] <= 1.0
    assert loso["settings"]["read_tokens"] == 48 and loso["settings"]["window"] == 24
    assert sum(r["cut_at_read_bound"] for r in loso["rows"]) > 0  # some replies run past the 48 tokens read
    assert [m["groups"] for m in loso["means"]] == [3, 3]
    assert "| xstest_completions | token rolling_max k=16 |" in (out / "loso.md").read_text()
    result = runner.invoke(app, [*base, "evaluate-stream", "--bundle", str(bundle), "--leave-source-out",
                                 "--smoothing", "ema:0.9,rolling_max:sixteen", "--out", str(out)])
    assert result.exit_code == 2 and "--smoothing" in result.output
    result = runner.invoke(app, [*base, "evaluate-stream", "--bundle", str(bundle), "--read-tokens", "64",
                                 "--out", str(out)])
    assert result.exit_code == 2 and "--leave-source-out only" in result.output

    result = runner.invoke(app, [*base, "bench", "stream", "--bundle", str(bundle), "--n", "3", "--chunks", "4",
                                 "--data", str(files[0])])
    assert result.exit_code == 0, result.output
    bench = orjson.loads(result.stdout)
    assert bench["responses"] == 3 and bench["chunks_per_response"] == 4
    assert bench["max_abs_peak_logit_gap"] < 1e-3  # both sides read the same tokens
    assert bench["memory_per_open_response_bytes"]["kv_cache_mean"] > 0

    result = runner.invoke(app, [*base, "bench", "stream", "--bundle", str(bundle), "--n", "3", "--chunks", "4",
                                 "--batch", "2", "--data", str(files[0])])
    assert result.exit_code == 0, result.output
    batched = orjson.loads(result.stdout)
    assert batched["responses_per_pass"] == 2 and batched["response_tokens"] == bench["response_tokens"]
    assert batched["max_abs_peak_logit_gap"] < 1e-3  # batched passes read the same tokens, to the same states
    assert batched["batching"] == "packed"  # SmolLM2 runs SDPA: chunks share one row, not padded rows


def test_train_token_probe_on_an_encoder_is_a_clear_error(tmp_path: Path, stream_config: Path) -> None:
    config = stream_config.read_text().replace("smollm2-135m-instruct", "minilm-l6")
    stream_config.write_text(config)
    runner = CliRunner()
    base = ["--config", str(stream_config), "--no-progress"]
    bundle = tmp_path / "bundle"
    assert runner.invoke(app, [*base, "train-probe", "--out", str(bundle)]).exit_code == 0
    result = runner.invoke(app, [*base, "train-token-probe", "--bundle", str(bundle)])
    assert result.exit_code == 2 and "not a causal decoder" in result.output
