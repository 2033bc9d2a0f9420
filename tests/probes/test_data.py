from __future__ import annotations

from pathlib import Path

import pytest

from probes.config import DataConfig, SplitConfig
from probes.data import SPLITS, load_dataset, read_file, split_dataset
from probes.errors import DataError


def test_reads_flat_and_conversation_files(datasets_dir: Path) -> None:
    flat = read_file(datasets_dir / "xstest.jsonl")
    assert len(flat) > 300 and {r.label for r in flat} == {0, 1}
    assert all(len(r.messages) == 1 and r.messages[0].role == "user" for r in flat)
    convs = read_file(datasets_dir / "dices_990.conversations.jsonl")
    assert any(len(r.messages) > 2 for r in convs)
    assert {m.role for r in convs for m in r.messages} <= {"user", "assistant"}


def test_missing_file_error_names_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.jsonl.*not found"):
        read_file(tmp_path / "nope.jsonl")


def test_malformed_line_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "text": "x", "label": 0, "source": "s"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        read_file(path)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "a", "text": "x", "label": 2}', "label"),
        ('{"id": "a", "label": 1}', "text"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_invalid_records(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DataError, match=message):
        read_file(path)


def test_bad_turns_in_conversation_file(tmp_path: Path) -> None:
    path = tmp_path / "x.conversations.jsonl"
    path.write_text('{"conversation_id": "c", "turns": [{"role": "robot", "content": "x"}], "label": 0}\n')
    with pytest.raises(DataError, match=r"x\.conversations\.jsonl:1: each turn"):
        read_file(path)


def _config(datasets_dir: Path, **kw: object) -> DataConfig:
    options: dict[str, object] = {"max_per_source": 150, **kw}
    return DataConfig(
        datasets_dir=datasets_dir,
        files=("xstest.jsonl", "harmbench.jsonl", "tdc2023.jsonl", "alpaca_benign.jsonl"),
        **options,  # type: ignore[arg-type]
    )


def test_filters_cap_and_balance(datasets_dir: Path) -> None:
    data = load_dataset(_config(datasets_dir))
    sources = {r.source for r in data.records}
    assert {"xstest", "harmbench", "tdc2023", "alpaca"} <= sources
    assert sum(r.source == "harmbench" for r in data.records) == 150
    positives = sum(data.labels)
    assert positives == len(data.records) - positives  # alpaca negatives balance the rest
    only = load_dataset(_config(datasets_dir, sources=("xstest",)))
    assert {r.source for r in only.records} == {"xstest"}
    cat = load_dataset(_config(datasets_dir, categories=("homonyms",)))
    assert {r.category for r in cat.records} == {"homonyms"}


def test_splits_are_disjoint_deterministic_and_recorded(datasets_dir: Path) -> None:
    data = load_dataset(_config(datasets_dir))
    a = split_dataset(data, SplitConfig(seed=3))
    b = split_dataset(data, SplitConfig(seed=3))
    c = split_dataset(data, SplitConfig(seed=4))
    keys = {name: {r.content_key() for r in a.get(name)} for name in SPLITS}
    for i, x in enumerate(SPLITS):
        for y in SPLITS[i + 1 :]:
            assert not keys[x] & keys[y], f"{x} and {y} share content"
    assert sum(len(a.get(n)) for n in SPLITS) == len(data.records)
    assert a == b and a != c
    sizes = a.sizes()
    assert sizes["probe_train"]["n"] > sizes["evaluation"]["n"] > 0


def test_duplicate_texts_across_sources_share_a_split(datasets_dir: Path) -> None:
    data = load_dataset(_config(datasets_dir, max_per_source=None))
    splits = split_dataset(data, SplitConfig())
    where: dict[str, set[str]] = {}
    for name in SPLITS:
        for r in splits.get(name):
            where.setdefault(r.content_key(), set()).add(name)
    assert any(len([r for r in data.records if r.content_key() == k]) > 1 for k in where)
    assert all(len(v) == 1 for v in where.values())


def test_split_fractions_must_sum_to_one() -> None:
    with pytest.raises(ValueError, match="add up to 1"):
        SplitConfig(probe_train=0.9)
