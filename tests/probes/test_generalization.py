from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from probes.conversation import Conversation, single_turn
from probes.data import Record
from probes.evaluation.generalization.folds import (
    AFTER,
    BEFORE,
    ExpertChoice,
    LosoConfig,
    Recipe,
    make_fold,
    source_weights,
)
from probes.evaluation.generalization.loso import run_loso, summarise_adapted
from probes.evaluation.generalization.pool import (
    DEFAULT_GROUPS,
    PoolConfig,
    PoolRecord,
    SourceGroup,
    build_pool,
    normalised_text_hash,
)
from probes.evaluation.generalization.report import write_report
from probes.evaluation.generalization.scoring import (
    adapt_fold,
    certified_cut,
    decision_figures,
    recentre,
    score_fold,
    tpr_at_fpr,
)

TINY_GROUPS = (
    SourceGroup(name="xstest", files=("xstest.jsonl",)),
    SourceGroup(name="forbidden_questions", files=("forbidden_questions.jsonl",)),
    SourceGroup(name="tweets", files=("davidson_hate_offensive.jsonl",)),
    SourceGroup(name="harmful_behaviors", files=("advbench.jsonl", "harmbench.jsonl")),
    SourceGroup(name="alpaca", files=("alpaca_benign.jsonl",)),
)


def tiny_config(recipes: tuple[Recipe, ...]) -> LosoConfig:
    return LosoConfig(
        pool=PoolConfig(groups=TINY_GROUPS, per_file=14, per_file_overrides={"alpaca_benign.jsonl": 30}),
        recipes=recipes, probe_spec="minilm-l6", probe_max_tokens=48, dtype="fp32",
        expert=ExpertChoice(spec="minilm-l6", max_tokens=48), alphas=(0.1, 0.3), calibration_fraction=0.4,
        dv_feature_sets=("margin",),
    )


def test_folds_never_leak_the_held_out_group(datasets_dir: Path) -> None:
    groups = (*DEFAULT_GROUPS,)
    pool = build_pool(datasets_dir, PoolConfig(groups=groups, per_file=20))
    # plant a near-duplicate of a held-out xstest prompt in another group: it must not reach training either
    xs = next(p for p in pool if p.group == "xstest" and len(p.record.messages) == 1)
    twin = Record(id="twin", messages=single_turn("  " + xs.record.messages[0].content.upper() + " !"), label=1,
                  source="advbench", file="advbench.jsonl")
    pool.append(PoolRecord(twin, "harmful_behaviors", twin.content_key(), normalised_text_hash(twin)))
    assert pool[-1].dedup_key == xs.dedup_key
    for recipe in (BEFORE, AFTER):
        for group in groups:
            fold = make_fold(pool, group.name, recipe, calibration_fraction=0.3)
            train = np.concatenate([fold.fit, fold.calibration])
            assert set(fold.test) == {i for i, p in enumerate(pool) if p.group == group.name}
            assert not set(train) & set(fold.test)
            assert not {pool[i].record.file for i in train} & set(group.files)
            assert not {pool[i].dedup_key for i in train} & {pool[i].dedup_key for i in fold.test}
            assert not set(fold.fit) & set(fold.calibration)
            if recipe.files is not None:
                assert {pool[i].record.file for i in train} <= set(recipe.files)


def test_before_recipe_caps_sources_and_balances_with_alpaca(datasets_dir: Path) -> None:
    pool = build_pool(datasets_dir, PoolConfig(per_file=200, per_file_overrides={"alpaca_benign.jsonl": 3000}))
    fold = make_fold(pool, "tweets", BEFORE, calibration_fraction=0.3)
    rows = np.concatenate([fold.fit, fold.calibration])
    files = [pool[i].record.file for i in rows]
    non_alpaca = [f for f in files if f != "alpaca_benign.jsonl"]
    assert max(non_alpaca.count(f) for f in set(non_alpaca)) <= 150
    labels = [pool[i].record.label for i in rows]
    assert abs(sum(labels) - (len(labels) - sum(labels))) <= 2  # alpaca fills the negatives up to the positives


def test_source_budget_and_class_balance_weights() -> None:
    recs = [Record(id=str(i), messages=single_turn(f"t{i}"), label=int(i < 30), source="s",
                   file="big.jsonl" if i < 30 else "small.jsonl") for i in range(40)]
    pool = [PoolRecord(r, "x", r.content_key(), normalised_text_hash(r)) for r in recs]
    w = source_weights(pool, list(range(40)), Recipe(name="t", source_budget=10, class_balance=True))
    assert w[:30].sum() == pytest.approx(w[30:].sum())
    assert w.mean() == pytest.approx(1.0)


def test_metrics_tpr_at_fpr_and_certified_cut() -> None:
    y = np.array([0] * 100 + [1] * 10)
    s = np.concatenate([np.linspace(0, 0.5, 100), np.linspace(0.45, 0.9, 10)])
    assert tpr_at_fpr(y, s, 0.01) == pytest.approx(0.9)
    figs = decision_figures(y, s)
    assert figs["majority_rate"] == pytest.approx(100 / 110) and figs["fpr"] == pytest.approx(0.01)
    assert math.isnan(decision_figures(np.ones(5), np.ones(5))["auroc"])
    benign = np.random.default_rng(0).uniform(size=2000)
    cut = certified_cut(benign, epsilon=0.05, delta=0.1)
    assert cut is not None and np.mean(benign > cut) <= 0.05 and np.mean(benign > cut) > 0.03
    assert recentre(np.array([cut]), cut)[0] == pytest.approx(0.5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_loso_end_to_end_on_a_tiny_config(tmp_path: Path, datasets_dir: Path) -> None:
    after = AFTER.model_copy(update={"variants": ((2, "mean"), (4, "max")), "epsilon": 0.2})
    before = BEFORE.model_copy(update={"variants": ((4, "mean"),), "files": None})
    config = tiny_config((before, after))
    report = run_loso(config, cache_dir=tmp_path, datasets_dir=datasets_dir, sweep=[((4, "mean"),), ((4, "rollmax8"),)])
    assert report["computed"]["probe_records"] == report["pool"]["n"]
    for name in ("before", "after"):
        groups = report["recipes"][name]["groups"]
        assert set(groups) == {grp.name for grp in TINY_GROUPS}
        xs = groups["xstest"]
        assert 0.0 <= xs["probe"]["auroc"] <= 1.0 and xs["probe"]["n"] == 14
        assert [r["alpha"] for r in xs["policies"]["uncertainty"]] == [0.1, 0.3]
        assert groups["alpaca"]["probe"]["positives"] == 0 and not math.isnan(groups["alpaca"]["probe"]["fpr"])
        mean = report["recipes"][name]["mean"]
        assert mean["groups_both_classes"] == 3 and mean["groups_harmful_only"] == 1
    assert report["recipes"]["after"]["groups"]["xstest"]["cuts"]["probe"] != 0.5
    assert len(report["sweep"]["rows"]) == 2
    # a rerun reads every vector from the per-record cache
    again = run_loso(config, cache_dir=tmp_path, datasets_dir=datasets_dir)
    assert again["computed"] == {"probe_records": 0, "expert_records": 0}
    assert write_report(report, tmp_path).read_text().count("| xstest |") == 2


def test_adapt_fold_lets_a_correct_guard_teach_the_probe_scored_on_the_unaudited_half() -> None:
    """Training groups carry harm on feature 0, the held-out group on feature 1: the offline probe is at chance
    there, a Platt refit cannot reorder it, a head refit from the oracle guard's audits can."""
    rng = np.random.default_rng(4)
    recs, groups, xs = [], [], []
    for i in range(900):
        group = "held" if i >= 600 else "train"
        label = int(rng.random() < 0.4)
        x = rng.normal(size=6).astype(np.float32)
        x[0 if group == "train" else 1] += 3.0 * label
        recs.append(Record(id=str(i), messages=single_turn(f"text {i}"), label=label, source=group,
                           file=f"{group}.jsonl"))
        groups.append(group)
        xs.append(x)
    pool = [PoolRecord(r, grp, r.content_key(), normalised_text_hash(r)) for r, grp in zip(recs, groups, strict=True)]
    x = np.stack(xs)
    y = np.asarray([r.label for r in recs], dtype=np.int64)
    recipe = AFTER.model_copy(update={"epsilon": 0.1})
    config = LosoConfig(pool=PoolConfig(groups=(SourceGroup(name="train", files=("train.jsonl",)),
                                                    SourceGroup(name="held", files=("held.jsonl",)))),
                          adapt_audits=120)
    fold = make_fold(pool, "held", recipe, calibration_fraction=0.3)
    s = score_fold(fold, x, x, y, recipe, 1.0, delta=0.1)
    truth = {r.messages: r.label for r in recs}
    calls: list[int] = []

    def guard_model(conversations: Sequence[Conversation]) -> list[float]:  # a guard model that is always right
        calls.append(len(conversations))
        return [float(truth[c]) for c in conversations]

    a = adapt_fold(pool, fold, x, y, s, recipe, config, guard_model)
    assert calls == [120], "the guard model scores the audited records only, in one call"
    assert a["head_model_guard"] == a["head_oracle_guard"]
    assert a["audits"] == 120 and a["evaluated"] + a["audits"] <= len(fold.test)
    assert a["evaluated"] > 100
    assert a["offline"]["auroc"] < 0.65
    assert a["platt_oracle_guard"]["auroc"] == pytest.approx(a["offline"]["auroc"], abs=1e-9)
    taught = a["head_oracle_guard"]
    assert taught["source"] == "window" and taught["auroc"] > 0.9
    assert taught["accuracy"] > taught["majority_rate"] and taught["fpr"] <= 0.1 + 0.05
    summary = summarise_adapted([a])
    assert summary["groups_both_classes"] == 1 and summary["head_oracle_guard"]["above_majority"] == 1
    assert "head_model_guard" in summary
