from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from probes.evaluation.dilution import DISGUISES, REQUEST_FILES
from probes.evaluation.generalization.folds import AFTER
from probes.evaluation.generalization.loso import sweep_variants
from probes.evaluation.generalization.pool import build_pool, fill_probe_features
from probes.evaluation.generalization.report import write_report
from probes.evaluation.generalization.token_dilution import REQUEST_GROUP, run_token_dilution
from probes.evaluation.generalization.token_scorer import (
    parse_token_fits,
    report_lines,
    run_token_comparison,
    variant_name,
)
from probes.fitting.token_scorer import TokenScorerFit
from tests.probes.test_generalization import tiny_config

FIT = TokenScorerFit(window=4, epochs=40)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_parse_token_fits() -> None:
    fits = parse_token_fits("maxmean:16, broadcast:4,")
    assert [(f.objective, f.window) for f in fits] == [("maxmean", 16), ("broadcast", 4)]
    assert parse_token_fits("") == ()
    for bad in ("maxmean", "mean:16", "maxmean:0", "maxmean:x"):
        with pytest.raises(ValueError):
            parse_token_fits(bad)


def test_comparison_scores_both_on_the_same_folds(datasets_dir: Path, cache_dir: Path) -> None:
    config = tiny_config((AFTER,))
    result = run_token_comparison(config, AFTER, cache_dir=cache_dir, datasets_dir=datasets_dir, fits=(FIT,),
                                  layer=4)
    pool = build_pool(datasets_dir, config.pool)
    names = ["mean-pooled probe", variant_name("maxmean", 4)]
    assert set(result["groups"]) == {g.name for g in config.pool.groups}
    for group, row in result["groups"].items():
        assert list(row) == names
        n = sum(p.group == group for p in pool)
        assert row[names[0]]["n"] == row[names[1]]["n"] == n
    assert result["pool"]["n"] == len(pool) and result["max_tokens"] == 48
    # the baseline is the sweep's probe on the same folds: same AUROC per group
    features, _ = fill_probe_features(cache_dir, pool, [(4, "mean")], spec="minilm-l6", max_tokens=48, dtype="fp32")
    sweep = sweep_variants(pool, features, [((4, "mean"),)], AFTER, config)[0]["per_group_auroc"]
    for group, auroc in sweep.items():
        got = result["groups"][group][names[0]]["auroc"]
        assert (np.isnan(auroc) and np.isnan(got)) or got == pytest.approx(auroc)
    mean = result["mean"][names[1]]
    assert mean["groups_both_classes"] == 3 and 0.0 <= mean["auroc"] <= 1.0
    assert not np.isnan(mean["recall_harmful_only"]) and not np.isnan(mean["fpr_benign_only"])
    assert any(variant_name("maxmean", 4) in line for line in report_lines(result))


def test_token_dilution_holds_out_the_requests_and_reads_them_whole(
        datasets_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    config = tiny_config((AFTER,))
    result = run_token_dilution(config, AFTER, FIT, cache_dir=cache_dir, datasets_dir=datasets_dir, n=3,
                                lengths=(48,), max_tokens=200, layer=4)
    group = next(g for g in config.pool.groups if g.name == REQUEST_GROUP)
    assert not set(result["trained_files"]) & (set(group.files) | set(REQUEST_FILES))
    assert set(result["request_files"]) <= set(REQUEST_FILES)
    for who in ("token", "mean_probe"):
        rows = result[who]["transformations"]
        assert set(rows) == {f"{p}_48" for p in ("before", "after", "around", "gap")} | set(DISGUISES)
        assert all(rows[d]["held"] == 1.0 for d in DISGUISES)  # normalised to the clean request's tokens
        assert result[who]["n_requests"] == 3 and "filler_only_48" in result[who]["controls"]
    assert result["token"]["cut"] == (result["cuts"]["token"] or 0.5)
    write_report({"config": config.model_dump(mode="json"), "recipes": {}, "token_dilution": result}, tmp_path)
    assert "One-pass read" in (tmp_path / "report.md").read_text()
