"""The console script end to end on a small real configuration (MiniLM, a few hundred real rows)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from ctd_monitor.cli import app
from probes.bundle import load_bundle


@pytest.fixture
def small_config(tmp_path: Path, datasets_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CTD_CACHE_DIR", str(cache_dir))
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""
model: {{spec: minilm-l6, dtype: fp32, max_tokens: 64}}
features: {{layer: 4, pooling: mean}}
data:
  datasets_dir: {datasets_dir}
  files: [xstest.jsonl, harmbench.jsonl, alpaca_benign.jsonl]
  max_per_source: 60
expert:
  encoder_head: {{backbone: minilm-l6, max_length: 32, epochs: 1, max_train: 24, dtype: fp32}}
"""
    )
    return path


def test_train_probe_writes_a_bundle_and_extract_is_cached(tmp_path: Path, small_config: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "bundle"
    result = runner.invoke(app, ["--config", str(small_config), "--no-progress", "train-probe", "--out", str(out)])
    assert result.exit_code == 0, result.output
    payload = orjson.loads(result.stdout)
    assert payload["evaluation"]["auroc"] > 0.7
    bundle = load_bundle(out)
    assert bundle.manifest["model"]["spec"] == "minilm-l6" and "safety" in bundle.heads
    assert bundle.manifest["data"]["split_sizes"]["evaluation"]["n"] == payload["evaluation"]["n"]
    again = runner.invoke(app, ["--config", str(small_config), "--no-progress", "extract"])
    assert again.exit_code == 0, again.output
    assert orjson.loads(again.stdout)["cached"] is True


def test_train_runs_probe_and_expert(tmp_path: Path, small_config: Path) -> None:
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["--config", str(small_config), "--no-progress", "train", "--out", str(out)])
    assert result.exit_code == 0, result.output
    payload = orjson.loads(result.stdout)
    assert set(payload) >= {"probe_only", "expert_only", "split_sizes"}
    assert load_bundle(out).manifest["expert"]["backend"] == "encoder-head"


def test_missing_data_file_is_a_clear_error(tmp_path: Path, small_config: Path) -> None:
    result = CliRunner().invoke(
        app, ["--config", str(small_config), "--no-progress", "train-probe", "--data", str(tmp_path / "x.jsonl")]
    )
    assert result.exit_code == 2
    assert "x.jsonl" in result.output and "not found" in result.output


def test_malformed_line_names_file_and_line(tmp_path: Path, small_config: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "hi", "label": 0, "source": "s"}\n{"id": \n')
    result = CliRunner().invoke(app, ["--config", str(small_config), "--no-progress", "extract", "--data", str(bad)])
    assert result.exit_code == 2
    assert "bad.jsonl:2" in result.output


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {dtype: fp8}\n")
    result = CliRunner().invoke(app, ["--config", str(path), "extract"])
    assert result.exit_code == 2 and "invalid configuration" in result.output
