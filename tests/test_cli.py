"""The console script end to end on a small real configuration (MiniLM, a few hundred real rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from ctd_monitor.cli import app
from probes.config import EncoderHeadConfig
from probes.data import read_file
from probes.experts.encoder_head import train_encoder_head
from probes.heads.inference import CUT_EXTRA_FEATURES
from probes.runtime.bundle import load_bundle
from tests.conftest import share_models


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
    assert bundle.manifest.model.spec == "minilm-l6" and "safety" in bundle.heads
    assert bundle.manifest.data.split_sizes["evaluation"]["n"] == payload["evaluation"]["n"]
    again = runner.invoke(app, ["--config", str(small_config), "--no-progress", "extract"])
    assert again.exit_code == 0, again.output
    assert orjson.loads(again.stdout)["cached"] is True


def test_train_runs_probe_and_expert(tmp_path: Path, small_config: Path) -> None:
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["--config", str(small_config), "--no-progress", "train", "--out", str(out)])
    assert result.exit_code == 0, result.output
    payload = orjson.loads(result.stdout)
    assert set(payload) >= {"probe_only", "expert_only", "split_sizes"}
    expert = load_bundle(out).manifest.expert
    assert expert is not None and expert.backend == "encoder-head"


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


def test_ctd_workflow_train_dv_calibrate_evaluate_validate(
    tmp_path: Path, datasets_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole CTD method through the CLI on MiniLM (layer 2: a deliberately weak probe) and a MiniLM expert."""
    monkeypatch.setenv("CTD_CACHE_DIR", str(cache_dir))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
model: {{spec: minilm-l6, dtype: fp32, max_tokens: 48}}
features: {{layer: 1, pooling: mean}}
data:
  datasets_dir: {datasets_dir}
  files: [xstest.jsonl, harmbench.jsonl, forbidden_questions.jsonl, tense_reformulations.jsonl, alpaca_benign.jsonl]
  max_per_source: 120
expert:
  encoder_head: {{backbone: minilm-l6, max_length: 64, epochs: 2, max_train: 400, dtype: fp32, train_layers: all}}
"""
    )
    bundle = tmp_path / "bundle"
    runner = CliRunner()

    def run(*args: str) -> dict:
        result = runner.invoke(app, ["--config", str(config), "--no-progress", *args])
        assert result.exit_code == 0, result.output
        return orjson.loads(result.stdout)

    run("train", "--out", str(bundle))
    dv = run("train-dv", "--bundle", str(bundle), "--epsilon", "0.1", "--delta", "0.1")
    assert dv["train"]["helps"] >= 5 and dv["source"] == "crossfit"
    # The DV target and margin are taken at the cuts certified on dev (ε as calibrate's), not at 0.5.
    dv_info = load_bundle(bundle).manifest.heads["dv"]
    assert dv_info.extra_features == CUT_EXTRA_FEATURES and set(dv_info.decision_cuts) == {"probe", "expert"}
    assert set(dv["cv_auroc"]) == {"margin", "extras", "full"} and dv["feature_set"] in dv["cv_auroc"]
    assert set(dv["quality"]["evaluation"]) == {"dv", "uncertainty", "router"}
    cal = run("calibrate", "--bundle", str(bundle), "--alpha", "0.2", "--delta", "0.1", "--epsilon", "0.1")
    assert cal["signal"] == "dv" and cal["alpha"] == 0.2 and cal["n_cal"] > 0
    manifest = load_bundle(bundle).manifest
    assert manifest.calibration is not None and manifest.calibration.threshold == cal["threshold"]
    assert "dv" in manifest.head_names
    # Both unsafe cuts certified on the calibration split and stored; the probe's replaces the literal 0.5.
    probe_cut, expert_cut = manifest.unsafe_cut, manifest.expert_unsafe_cut
    assert probe_cut is not None and expert_cut is not None and cal["unsafe_cut"]["cut"] == probe_cut.cut
    assert probe_cut.scorer == "probe" and expert_cut.scorer == manifest.expert.name  # type: ignore[union-attr]
    for cut in (probe_cut, expert_cut):
        assert cut.valid and cut.epsilon == 0.1 and cut.n > 0 and cut.fpr is not None and cut.fpr <= 0.1
    assert manifest.probe_cut == probe_cut.cut != 0.5
    # ... and the cut for long conversations, on long benign dialogues read as the worker reads them
    long = manifest.long_unsafe_cut
    assert long is not None and long.cut.n == 200 and cal["long_unsafe_cut"]["cut"]["cut"] == long.cut.cut
    assert long.cut.valid and long.cut.fpr is not None and long.cut.fpr <= 0.1 and long.max_tokens == 48
    assert manifest.long_probe_cut == max(long.cut.cut, probe_cut.cut)
    # ... and the expert's, on the same dialogues, scored as the guard scores them
    expert_long = manifest.expert_long_cut(expert_cut.scorer)
    assert expert_long is not None and expert_long.cut.n == 200 and expert_long.files == long.files
    assert cal["expert_long_unsafe_cut"]["cut"]["cut"] == expert_long.cut.cut and expert_long.cut.fpr <= 0.1  # type: ignore[operator]
    assert expert_long.expert_read == cal["expert_long_unsafe_cut"]["expert_read"] == "whole_and_user_turns"
    out = tmp_path / "eval"
    summary = run("evaluate", "--bundle", str(bundle), "--budgets", "0.1,0.3", "--out", str(out))
    metrics = orjson.loads((out / "metrics.json").read_bytes())
    assert summary["n"] == metrics["n"] > 0
    assert set(metrics["policies"]) == {"ctd", "uncertainty", "router", "random", "oracle"}
    for rows in metrics["policies"].values():
        assert [r["alpha"] for r in rows] == [0.1, 0.3]
        assert all({"threshold", "realized_rate", "auroc", "accuracy", "f1", "expert_calls_per_1k"} <= set(r)
                   for r in rows)
    assert set(metrics["faic"]) >= {"ctd", "uncertainty", "router"}
    # evaluation decides at the bundle's cuts and reports the realised benign flag rate
    assert metrics["cuts"]["applied"] == {"probe": probe_cut.cut, "expert": expert_cut.cut}
    assert 0 <= metrics["probe_only"]["fpr"] <= 1 and all("fpr" in r for r in metrics["policies"]["ctd"])
    assert (out / "report.md").is_file() and (out / "metrics_vs_budget.png").stat().st_size > 1000
    assert (out / "realized_vs_target.png").is_file()
    # per-file realised rates when several evaluation files are given
    data = [str(datasets_dir / "xstest.jsonl"), str(datasets_dir / "simple_safety_tests.jsonl")]
    run("evaluate", "--bundle", str(bundle), "--data", data[0], "--data", data[1], "--budgets", "0.2",
        "--out", str(tmp_path / "eval2"))
    assert set(orjson.loads((tmp_path / "eval2" / "metrics.json").read_bytes())["per_file"]) == {
        "xstest.jsonl", "simple_safety_tests.jsonl"}
    v = run("validate-guarantee", "--bundle", str(bundle), "--alpha", "0.2", "--delta", "0.1", "--splits", "200")
    assert v["splits"] == 200 and 0 <= v["violation_rate"] <= 1 and v["signal"] == "dv"
    assert v["violation_rate_population"] <= 0.1 + 3 * (0.09 / 200) ** 0.5
    # The uncertainty signal is calibrated around the probe's cut, and the manifest says so for the worker.
    run("calibrate", "--bundle", str(bundle), "--alpha", "0.2", "--delta", "0.1", "--epsilon", "0.1",
        "--signal", "uncertainty")
    calibration = load_bundle(bundle).manifest.calibration
    assert calibration is not None and calibration.signal == "uncertainty"
    assert calibration.uncertainty_centre == load_bundle(bundle).manifest.probe_cut


def test_guard_service_without_an_expert_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--no-progress", "expert"])
    assert result.exit_code == 2
    assert "encoder-head expert: set expert.path" in result.output
    missing = CliRunner().invoke(app, ["--no-progress", "expert", "--bundle", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "nope" in missing.output


def test_guard_config_with_unknown_alert_keys_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "guard.yaml"
    config.write_text("alerts: {include_conversation: true}\n")
    result = CliRunner().invoke(app, ["--config", str(config), "--no-progress", "expert"])
    assert result.exit_code == 2 and "include_conversation" in result.output


TINY_GROUP_FILES = {"xstest": "xstest.jsonl", "tweets": "davidson_hate_offensive.jsonl", "harmful": "harmbench.jsonl",
                    "alpaca": "alpaca_benign.jsonl"}


def _tiny_loso(tmp_path: Path, groups: tuple[str, ...], *, xstest: int = 40, extra: str = "") -> Path:
    """A leave-source-out config of a tiny pool: 10 rows per file (alpaca 20, xstest ``xstest``), these groups."""
    loso = tmp_path / "loso.yaml"
    loso.write_text(
        f"pool:\n  per_file: 10\n  per_file_overrides: {{alpaca_benign.jsonl: 20, xstest.jsonl: {xstest}}}\n"
        "  groups:\n" + "".join(f"    - {{name: {g}, files: [{TINY_GROUP_FILES[g]}]}}\n" for g in groups) + extra
    )
    return loso


def _tiny_generalization(tmp_path: Path, config: Path, out: Path, *, groups: tuple[str, ...],
                         extra: tuple[str, ...] = ()) -> Any:
    """`bench generalization` on a tiny pool (MiniLM for probe and frozen expert), 15 adaptation audits."""
    loso = _tiny_loso(tmp_path, groups, extra="expert: {max_tokens: 48}\ndv_feature_sets: [margin]\n")
    result = CliRunner().invoke(app, [
        "--config", str(config), "--no-progress", "bench", "generalization", "--loso-config", str(loso),
        "--expert-spec", "minilm-l6", "--recipes", "before", "--budgets", "0.2", "--adapt-audits", "15",
        *extra, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result


def test_bench_generalization_writes_metrics_and_report(tmp_path: Path, small_config: Path, datasets_dir: Path) -> None:
    """The thin CLI over probes.evaluation.generalization: a tiny pool (MiniLM for probe and frozen expert)."""
    out = tmp_path / "gen"
    result = _tiny_generalization(tmp_path, small_config, out, groups=("xstest", "tweets", "harmful", "alpaca"))
    payload = orjson.loads(result.stdout)
    assert "frozen minilm-l6" in payload["expert"]
    assert payload["means"]["before"]["groups_both_classes"] == 2
    metrics = orjson.loads((out / "metrics.json").read_bytes())
    assert set(metrics["recipes"]["before"]["groups"]) == {"xstest", "tweets", "harmful", "alpaca"}
    assert "| xstest |" in (out / "report.md").read_text()
    adapted = metrics["recipes"]["before"]["groups"]["xstest"]["adapted"]
    assert adapted["audits"] == 15 and adapted["evaluated"] > 0
    assert {"head_oracle_guard", "platt_expert_guard"} <= set(adapted)
    assert "The guard teaches the probe" in (out / "report.md").read_text()
    bad = CliRunner().invoke(app, ["--config", str(small_config), "bench", "generalization", "--recipes", "nope"])
    assert bad.exit_code == 2
    no_audits = CliRunner().invoke(app, ["--config", str(small_config), "bench", "generalization", "--adapt-guard"])
    assert no_audits.exit_code == 2 and "--adapt-audits" in no_audits.output


def test_bench_generalization_heads_compares_linear_and_block_retraining_on_the_same_folds(
        tmp_path: Path, datasets_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--heads: SmolLM2's block 3 retrained on its cached inputs beside the logistic head (a RoPE decoder:
    MiniLM has no rotary embedding to retrain a block with)."""
    monkeypatch.setenv("CTD_CACHE_DIR", str(cache_dir))
    config = tmp_path / "smollm2.yaml"
    config.write_text(f"model: {{spec: smollm2-135m-instruct, dtype: fp32, max_tokens: 24}}\n"
                      f"features: {{layer: 3, pooling: mean}}\ndata: {{datasets_dir: {datasets_dir}}}\n")
    loso = _tiny_loso(tmp_path, ("xstest", "harmful", "alpaca"), xstest=30)
    out = tmp_path / "heads"
    result = CliRunner().invoke(app, [
        "--config", str(config), "--no-progress", "bench", "generalization", "--loso-config", str(loso),
        "--recipes", "broad", "--heads", "linear,block", "--block-epochs", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = orjson.loads((out / "metrics.json").read_bytes())
    run = metrics["recipes"]["broad"]
    assert run["block"] == 3 and run["heads"] == ["linear", "block"]
    assert set(run["groups"]) == {"xstest", "harmful", "alpaca"}
    assert len(run["groups"]["xstest"]["block"]["epoch_losses"]) == 2
    assert orjson.loads((out / "partial.json").read_bytes())["groups"].keys() == run["groups"].keys()
    assert "| xstest |" in (out / "heads.md").read_text()
    bad = CliRunner().invoke(app, ["--config", str(config), "bench", "generalization", "--heads", "linear,tree"])
    assert bad.exit_code == 2 and "tree" in bad.output


def test_bench_generalization_token_scorer_beside_the_mean_pooled_probe(
        tmp_path: Path, small_config: Path, datasets_dir: Path) -> None:
    """`--token-scorer` alone (`--recipes ''`): the comparison on the recipe's folds, in metrics.json and report.md."""
    loso = _tiny_loso(tmp_path, ("xstest", "harmful", "alpaca"))
    out = tmp_path / "tok"
    result = CliRunner().invoke(app, [
        "--config", str(small_config), "--no-progress", "bench", "generalization", "--loso-config", str(loso),
        "--recipes", "", "--token-scorer", "maxmean:4", "--token-recipe", "after", "--out", str(out)])
    assert result.exit_code == 0, result.output
    payload = orjson.loads(result.stdout)
    assert set(payload["token_scorer"]) == {"mean-pooled probe", "token maxmean w4"}
    metrics = orjson.loads((out / "metrics.json").read_bytes())
    assert set(metrics["token_scorer"]["groups"]) == {"xstest", "harmful", "alpaca"}
    assert metrics["token_scorer"]["recipe"]["name"] == "after" and metrics["token_scorer"]["max_tokens"] == 64
    assert "Token-level scorer vs mean-pooled probe" in (out / "report.md").read_text()
    dilution = ["--token-scorer", "maxmean:4", "--token-dilution", "2", "--token-padding"]
    for bad in (["--token-scorer", "mean:4"], ["--token-dilution", "2"], ["--token-padding"],
                [*dilution, "--token-padding-filler", "coconot.jsonl,alpaca_benign.jsonl"],
                [*dilution, "--token-padding-filler", "alpaca_benign.jsonl"],  # the yardstick's own filler
                [*dilution, "--token-padding-filler", "advbench.jsonl"], [*dilution, "--token-padding-rows", "4,2"],
                [*dilution, "--token-read", "windows:64:128"], [*dilution, "--token-read", "windows:64"]):
        refused = CliRunner().invoke(app, ["--config", str(small_config), "bench", "generalization", *bad])
        assert refused.exit_code == 2, refused.output


def test_bench_generalization_adapt_guard_labels_audits_with_the_configured_expert_backend(
        tmp_path: Path, small_config: Path, datasets_dir: Path, cache_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--adapt-guard: a real expert backend (a MiniLM encoder-head trained here) labels the audits."""
    private = tmp_path / "expert-cache"
    private.mkdir()
    share_models(private, cache_dir, "minilm-l6")
    records = read_file(datasets_dir / "harmbench.jsonl")[:20] + read_file(datasets_dir / "alpaca_benign.jsonl")[:20]
    trained = train_encoder_head(EncoderHeadConfig(backbone="minilm-l6", max_length=32, epochs=1, batch_size=8,
                                                   max_train=40, dtype="fp32"), records, cache_dir=private)
    monkeypatch.setenv("CTD_EXPERT__PATH", str(trained))
    out = tmp_path / "gen"
    _tiny_generalization(tmp_path, small_config, out, groups=("xstest", "harmful", "alpaca"), extra=("--adapt-guard",))
    metrics = orjson.loads((out / "metrics.json").read_bytes())
    assert metrics["adapt_guard"].startswith("encoder-head")
    adapted = metrics["recipes"]["before"]["groups"]["xstest"]["adapted"]
    assert {"platt_model_guard", "head_model_guard"} <= set(adapted)
    assert "head_model_guard" in (out / "report.md").read_text()


def test_bench_adaptation_replays_held_out_groups(tmp_path: Path, small_config: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline cut vs online recalibration on a tiny pool (MiniLM probe and frozen expert)."""
    monkeypatch.setenv("CTD_AUDIT__EPSILON", "0.2")  # a 60-item window can certify 20 %, not 5 %
    loso = tmp_path / "loso.yaml"
    loso.write_text(
        "pool:\n  per_file: 12\n  per_file_overrides: {alpaca_benign.jsonl: 40}\n  groups:\n"
        "    - {name: xstest, files: [xstest.jsonl]}\n"
        "    - {name: tweets, files: [davidson_hate_offensive.jsonl]}\n"
        "    - {name: harmful, files: [harmbench.jsonl, advbench.jsonl]}\n"
        "    - {name: alpaca, files: [alpaca_benign.jsonl]}\n"
        "expert: {max_tokens: 48}\n"
    )
    out = tmp_path / "adapt"
    replay = ["--config", str(small_config), "--no-progress", "bench", "adaptation", "--loso-config", str(loso),
              "--expert-spec", "minilm-l6", "--events", "300", "--audit-rate", "0.5", "--window", "60",
              "--refit-every", "10", "--out", str(out)]
    result = CliRunner().invoke(app, [*replay, "--held-out", "tweets,xstest", "--min-window", "20",
                                      "--guard-cut", "0.3"])
    assert result.exit_code == 0, result.output
    payload = orjson.loads(result.stdout)
    assert list(payload["phases"]) == ["training_mix", "tweets", "xstest"]
    for phase in payload["phases"].values():
        # half the records may be audited (the figures count the other half's events only)
        assert phase["events"] == 300 and 30 < phase["audited"] < 120 and 0 < phase["scored_events"] < 300
        assert 0.0 <= phase["offline"]["accuracy"] <= 1.0 and 0.0 <= phase["online"]["accuracy"] <= 1.0
    assert payload["final_state"]["version"] > 0 and payload["final_state"]["n"] == 60
    assert payload["audit"]["epsilon"] == 0.2 and payload["guard_cut"] == 0.3
    assert payload["phases"]["training_mix"]["under_window_cut"] < 1.0  # the bundle's cut until min_window
    assert max(p["under_window_cut"] for p in payload["phases"].values()) > 0
    trace = orjson.loads((out / "adaptation.json").read_bytes())["trace"]
    assert len(trace["probe_cut"]) == 900
    head = CliRunner().invoke(app, [*replay, "--held-out", "xstest", "--min-window", "40", "--refit", "head"])
    assert head.exit_code == 0, head.output
    taught = orjson.loads(head.stdout)
    assert taught["refit"] == "head" and taught["final_state_oracle_guard"]["refit"] == "head"
    assert taught["final_state_oracle_guard"]["n"] == 60
    bad = CliRunner().invoke(app, ["--config", str(small_config), "--no-progress", "bench", "adaptation",
                                   "--loso-config", str(loso), "--held-out", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output
