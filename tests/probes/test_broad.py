"""Issue 21 point 1 on small slices of the real files: twins kept together, per-source class balance, weights per
group, the extended leave-source-out groups."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from probes.config import BROAD_FILES, CONTRASTIVE_FILES, DataConfig, SplitConfig
from probes.conversation import single_turn
from probes.data import Record, load_dataset, read_file, split_dataset
from probes.evaluation.generalization.folds import (
    BROAD,
    ExpertChoice,
    LosoConfig,
    Recipe,
    make_fold,
    source_weights,
)
from probes.evaluation.generalization.loso import run_loso
from probes.evaluation.generalization.pool import (
    BROAD_GROUPS,
    PoolConfig,
    PoolRecord,
    build_pool,
    normalised_text_hash,
)


def _twins(records: list[Record]) -> dict[str, list[Record]]:
    by: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by[r.twin_key()].append(r)
    return {k: v for k, v in by.items() if len(v) > 1}


@pytest.mark.parametrize(("name", "field"), [("hatemoji.jsonl", "pair_id"), ("hatecheck.jsonl", "template_family"),
                                             ("diasafety.conversations.jsonl", "context")])
def test_twins_share_a_key_and_a_split(datasets_dir: Path, name: str, field: str) -> None:
    records = read_file(datasets_dir / name)
    twins = _twins(records)
    assert len(twins) > 5 and all(k.startswith(field) for k in twins)
    # some twin groups hold both labels: exactly the pairs a random split would leak
    assert any(len({r.label for r in group}) == 2 for group in twins.values())
    config = DataConfig(datasets_dir=datasets_dir, files=(name,), max_per_source=None, balance_with=None)
    splits = split_dataset(load_dataset(config), SplitConfig())
    side = {r.id: s for s in ("probe_train", "dev", "calibration", "evaluation") for r in splits.get(s)}  # type: ignore[arg-type]
    for group in _twins(list(load_dataset(config).records)).values():
        assert len({side[r.id] for r in group}) == 1


def test_a_record_without_twins_keeps_its_content_split_key() -> None:
    r = Record(id="a", messages=single_turn("hello"), label=0, source="alpaca", file="alpaca_benign.jsonl")
    assert r.twin_key() == r.content_key()


def test_per_source_class_balance(datasets_dir: Path) -> None:
    config = DataConfig(datasets_dir=datasets_dir, files=("coconot.jsonl", "edos.jsonl", "advbench.jsonl"),
                        max_per_source=40, class_balance_per_source=True, balance_with=None)
    by_source: dict[str, list[int]] = defaultdict(list)
    for r in load_dataset(config).records:
        by_source[r.source].append(r.label)
    assert sorted(by_source["coconot"]) == [0] * 20 + [1] * 20
    assert sorted(by_source["edos"]) == [0] * 20 + [1] * 20
    assert by_source["advbench"] == [1] * 40  # one class: capped as before
    off = load_dataset(config.model_copy(update={"class_balance_per_source": False}))
    assert sum(r.label for r in off.records if r.source == "edos") < 20  # EDOS is 24 % sexist


def test_broad_files_and_groups_cover_every_contrastive_source(datasets_dir: Path) -> None:
    assert set(CONTRASTIVE_FILES) <= set(BROAD_FILES)
    grouped = {f for group in BROAD_GROUPS for f in group.files}
    assert set(CONTRASTIVE_FILES) <= grouped
    assert len(grouped) == sum(len(group.files) for group in BROAD_GROUPS)  # each file in one group
    assert all((datasets_dir / f).is_file() for f in grouped)
    names = {group.name for group in BROAD_GROUPS}
    assert {"hate_functional", "chat_abuse", "sexism", "response_safety", "over_refusal_contrast"} <= names


def test_broad_folds_keep_twins_on_one_side_and_leak_nothing(datasets_dir: Path) -> None:
    pool = build_pool(datasets_dir, PoolConfig(groups=BROAD_GROUPS, per_file=40,
                                                   per_file_overrides={"hatemoji.jsonl": 400, "hatecheck.jsonl": 200}))
    for group in ("hate_functional", "sexism", "harmful_behaviors"):
        fold = make_fold(pool, group, BROAD, calibration_fraction=0.3)
        train = np.concatenate([fold.fit, fold.calibration])
        assert not {pool[i].dedup_key for i in train} & {pool[i].dedup_key for i in fold.test}
        assert not {pool[i].record.file for i in train} & {pool[i].record.file for i in fold.test}
        sides: dict[str, set[str]] = defaultdict(set)
        for name, rows in (("fit", fold.fit), ("cal", fold.calibration)):
            for i in rows:
                sides[pool[i].side_key].add(name)
        assert all(len(s) == 1 for s in sides.values())
        if group != "hate_functional":  # its twins are on the training side here: some pairs must be whole there
            assert any(pool[i].twin.startswith("pair_id:") for i in train)


def test_source_class_balance_and_group_budget_weights() -> None:
    recs = ([Record(id=f"a{i}", messages=single_turn(f"a{i}"), label=int(i < 10), source="a", file="a.jsonl")
             for i in range(40)]
            + [Record(id=f"b{i}", messages=single_turn(f"b{i}"), label=1, source="b", file="b.jsonl")
               for i in range(100)]
            + [Record(id=f"c{i}", messages=single_turn(f"c{i}"), label=0, source="c", file="c.jsonl")
               for i in range(20)])
    pool = [PoolRecord(r, "big" if r.file != "c.jsonl" else "small", r.content_key(), normalised_text_hash(r))
            for r in recs]
    rows = list(range(len(pool)))
    w = source_weights(pool, rows, Recipe(name="t", source_class_balance=True))
    assert w[:10].sum() == pytest.approx(w[10:40].sum())  # file a: 10 positives weigh as much as 30 negatives
    w = source_weights(pool, rows, Recipe(name="t", group_budget=20.0))
    assert w[:140].sum() == pytest.approx(w[140:].sum())  # both groups at the budget, whatever their size
    w = source_weights(pool, rows, BROAD)
    assert w.mean() == pytest.approx(1.0) and (w > 0).all()


def test_broad_recipe_reports_the_new_groups_leave_source_out(datasets_dir: Path, cache_dir: Path) -> None:
    """End to end on a tiny pool (MiniLM probe and frozen expert): the contrastive groups are held out in turn and
    reported like the others."""
    names = ("xstest", "harmful_behaviors", "alpaca", "over_refusal_contrast", "hate_functional", "sexism")
    groups = tuple(grp for grp in BROAD_GROUPS if grp.name in names)
    broad = BROAD.model_copy(update={"variants": ((4, "mean"),), "source_budget": 6.0, "group_budget": 20.0,
                                       "epsilon": 0.2})
    config = LosoConfig(
        pool=PoolConfig(groups=groups, per_file=6, per_file_overrides={"alpaca_benign.jsonl": 24,
                                                                         "hatemoji.jsonl": 12, "edos.jsonl": 16}),
        recipes=(broad,), probe_spec="minilm-l6", probe_max_tokens=48, dtype="fp32",
        expert=ExpertChoice(spec="minilm-l6", max_tokens=48), alphas=(0.2,), calibration_fraction=0.4,
        dv_feature_sets=("margin",))
    report = run_loso(config, cache_dir=cache_dir, datasets_dir=datasets_dir)
    rows = report["recipes"]["broad"]["groups"]
    assert set(rows) == set(names)
    for name in ("over_refusal_contrast", "hate_functional", "sexism"):
        probe = rows[name]["probe"]
        assert probe["n"] == report["pool"]["groups"][name]["n"] and 0 < probe["positives"] < probe["n"]
        assert 0.0 <= probe["auroc"] <= 1.0
        assert not set(rows[name]["train_files"]) & set(report["pool"]["groups"][name]["files"])
    assert report["recipes"]["broad"]["mean"]["groups_both_classes"] == 4
