"""The drift simulator on real records scored by the small MiniLM bundle (no Kafka)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from ctd_monitor.bench.drift import default_phases, drift_stream, parse_phase, report, simulate
from ctd_monitor.cli import app
from probes.errors import ConfigError
from probes.runtime.monitor import Monitor
from worker.config import BudgetConfig

W = 300


@pytest.fixture
def bundle(small_bundle: Path) -> Path:
    return small_bundle  # the session's small MiniLM bundle (tests/worker/conftest.py)


def test_a_shifting_real_stream_breaks_the_offline_budget_and_the_controller_holds_it(
    monitor: Monitor, datasets_dir: Path, tmp_path: Path
) -> None:
    # The bundle's own training mix, a jailbreak burst, tweets the probes never saw, the training mix again.
    trained_on = list(monitor.bundle.manifest.data.file_sha256)
    phases = default_phases(trained_on, datasets_dir, 3 * W)
    config = BudgetConfig(window=W, min_window=W // 2, recertify_every=50, hard_cap=True, cap_burst=10)
    signals, pools = drift_stream(monitor, phases, pool=60, seed=0)
    assert signals.size == 4 * 3 * W and set(pools) == {f for p in phases for f in p.files}
    summary = report(signals, pools, phases, monitor.rule, config, tmp_path)
    alpha = summary["alpha"]
    offline, windowed, capped = (summary["policies"][p] for p in ("offline", "windowed", "capped"))
    # The scenario is a real shift: the jailbreak burst pushes the offline threshold over the budget.
    assert offline["phase_rates"][1] > alpha > offline["phase_rates"][0]
    assert offline["peak_window_rate"] > alpha
    # The cap holds every full window; windowed control spends fewer windows over α than the offline rule.
    assert capped["peak_window_rate"] <= alpha and capped["windows_over_alpha"] == 0 and capped["cap_hits"] > 0
    assert windowed["windows_over_alpha"] < offline["windows_over_alpha"]
    assert windowed["phase_rates"][1] < offline["phase_rates"][1]
    assert windowed["max_threshold"] > summary["offline_threshold"] == offline["max_threshold"]
    assert orjson.loads((tmp_path / "drift.json").read_bytes()) == summary
    assert (tmp_path / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Deterministic, and back to the offline rule once the window holds only normal traffic again.
    first, second = simulate(signals, monitor.rule, config), simulate(signals, monitor.rule, config)
    for policy in first:
        assert np.array_equal(first[policy]["delegated"], second[policy]["delegated"])
    settled = 9 * W + W + config.recertify_every
    assert np.array_equal(first["windowed"]["delegated"][settled:], first["offline"]["delegated"][settled:])
    assert (first["windowed"]["threshold"][settled:] == summary["offline_threshold"]).all()


def test_phase_specs_parse_and_reject_garbage(datasets_dir: Path) -> None:
    phase = parse_phase("burst=jailbreak_prompts_itw.jsonl+/abs/x.jsonl:250", datasets_dir)
    assert phase.name == "burst" and phase.events == 250
    assert phase.files == (datasets_dir / "jailbreak_prompts_itw.jsonl", Path("/abs/x.jsonl"))
    for bad in ("no-equals:5", "x=a.jsonl", "x=a.jsonl:zero", "x=a.jsonl:0"):
        with pytest.raises(ConfigError):
            parse_phase(bad, datasets_dir)


def test_bench_drift_command_prints_json_and_writes_the_plot(
    bundle: Path, datasets_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {"CTD_CACHE_DIR": cache_dir, "CTD_DATA__DATASETS_DIR": datasets_dir, "CTD_MODEL__SPEC": "minilm-l6",
                       "CTD_MODEL__DTYPE": "fp32", "CTD_BUDGET__WINDOW": 50, "CTD_BUDGET__MIN_WINDOW": 20,
                       "CTD_BUDGET__CAP_BURST": 5}.items():
        monkeypatch.setenv(key, str(value))
    out = tmp_path / "drift"
    result = CliRunner().invoke(app, [
        "--no-progress", "bench", "drift", "--bundle", str(bundle), "--out", str(out), "--pool", "15",
        "--phase", "calm=alpaca_benign.jsonl:120", "--phase", "burst=xstest.jsonl+jailbreak_prompts_itw.jsonl:150",
    ])
    assert result.exit_code == 0, result.output
    payload = orjson.loads(result.stdout)
    assert payload["window"] == 50 and payload["events"] == 270
    assert [p["name"] for p in payload["phases"]] == ["calm", "burst"] and payload["phases"][1]["start"] == 120
    assert set(payload["policies"]) == {"offline", "windowed", "capped"}
    assert payload["policies"]["capped"]["peak_window_rate"] <= payload["alpha"]
    assert (out / "drift.png").is_file() and orjson.loads((out / "drift.json").read_bytes()) == payload
