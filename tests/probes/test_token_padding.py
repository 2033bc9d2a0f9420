from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from probes.evaluation.dilution import FILLER_FILE, REQUEST_FILES
from probes.evaluation.generalization.folds import AFTER, make_fold
from probes.evaluation.generalization.pool import build_pool
from probes.evaluation.generalization.report import write_report
from probes.evaluation.generalization.token_dilution import REQUEST_GROUP, run_token_dilution, training_fold
from probes.evaluation.generalization.token_padding import (
    TokenPadding,
    check_filler_file,
    filler_texts,
    padded_rows,
)
from probes.evaluation.generalization.token_scorer import PADDED, run_token_comparison, variant_name
from probes.fitting.token_scorer import TokenScorerFit
from tests.probes.test_generalization import tiny_config

FILLER = "coconot.jsonl"  # a benign source outside the tiny pool's groups
PADDING = TokenPadding(filler_files=(FILLER,), padded=6, filler_only=3, calibration=3, lengths=(24, 40))


class WordTokenizer:
    """One id per whitespace word: decoding gives the words back, so each word of a text can be traced."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.ids: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [self.ids[w] for w in self._add(text.split())]}

    def _add(self, words: list[str]) -> list[str]:
        for w in words:
            if w not in self.ids:
                self.ids[w] = len(self.words)
                self.words.append(w)
        return words

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


def _fold(datasets_dir: Path) -> tuple[Any, Any]:
    config = tiny_config((AFTER,))
    pool = build_pool(datasets_dir, config.pool)
    fold = training_fold([p.record.file for p in pool], make_fold(
        pool, REQUEST_GROUP, AFTER, calibration_fraction=config.calibration_fraction, seed=config.seed))
    return pool, fold


def test_padded_rows_pad_fit_records_with_the_configured_filler_only(datasets_dir: Path) -> None:
    pool, fold = _fold(datasets_dir)
    rows = padded_rows(pool, fold, PADDING, WordTokenizer(), datasets_dir, calibration_fraction=0.4)
    kinds = np.asarray(rows.kinds)
    assert [int((kinds == k).sum()) for k in ("padded", "filler", "calibration")] == [6, 3, 3]
    assert int(rows.labels[kinds == "padded"].sum()) == 3 and not rows.labels[kinds != "padded"].any()
    assert (rows.weights[kinds == "calibration"] == 0).all() and (rows.weights[kinds != "calibration"] > 0).all()
    train, cal = filler_texts(datasets_dir, FILLER, seed=0, calibration_fraction=0.4)
    train_words = {w for t in train for w in t.split()}
    cal_words = {w for t in cal for w in t.split()}
    fit_texts = {pool[i].record.messages[0].content: pool[i].record.label for i in fold.fit
                 if len(pool[i].record.messages) == 1}
    for conversation, kind, label, n in zip(rows.conversations, rows.kinds, rows.labels, rows.lengths, strict=True):
        text = conversation[0].content
        if kind == "padded":
            # a fit record of the fold, its label kept, with exactly n filler words from the training split
            record = max((t for t in fit_texts if t in text), key=len)
            assert fit_texts[record] == label
            rest = text.replace(record, " ").split()
            assert len(rest) == n and set(rest) <= train_words
        else:
            words = text.split()
            assert len(words) == n and set(words) <= (train_words if kind == "filler" else cal_words)
    assert set(train) and set(cal) and not set(train) & set(cal)


@pytest.mark.parametrize("filler", [FILLER_FILE, *REQUEST_FILES[:2]])
def test_the_yardsticks_filler_and_held_out_files_are_refused(datasets_dir: Path, filler: str) -> None:
    pool, fold = _fold(datasets_dir)
    with pytest.raises(ValueError, match="yardstick|held out"):
        padded_rows(pool, fold, PADDING.model_copy(update={"filler_files": (filler,)}), WordTokenizer(), datasets_dir,
                    calibration_fraction=0.4)


def test_another_file_of_a_held_out_source_is_refused_too() -> None:
    check_filler_file("convabuse.conversations.jsonl", ["dices_990.conversations.jsonl"])  # not held out: fine
    with pytest.raises(ValueError, match="held out"):
        check_filler_file("convabuse.conversations.jsonl", ["convabuse.jsonl"])  # the same texts, another file
    with pytest.raises(ValueError, match="yardstick"):
        check_filler_file("alpaca_benign.conversations.jsonl")


@pytest.mark.usefixtures("torch_one_thread")
def test_token_dilution_scores_the_padded_scorer_beside_the_unpadded(datasets_dir: Path, cache_dir: Path,
                                                                     tmp_path: Path) -> None:
    config = tiny_config((AFTER,))
    fit = TokenScorerFit(window=4, epochs=40)
    result = run_token_dilution(config, AFTER, fit, cache_dir=cache_dir, datasets_dir=datasets_dir, n=3,
                                lengths=(48,), max_tokens=200, layer=4, padding=PADDING)
    pad = result["padding"]
    assert pad["filler_file"] == FILLER and pad["filler_file"] not in result["trained_files"] + [FILLER_FILE]
    assert {k: v["n"] for k, v in pad["rows"].items()} == {"padded": 6, "filler": 3, "calibration": 3}
    assert pad["calibration_rows"]["long_benign"] == 3 and pad["tokens"] > 6 * 24
    assert result["token_padded"]["cut"] == (result["cuts"]["token_padded"] or 0.5)
    assert set(result["token_padded"]["transformations"]) == set(result["token"]["transformations"])
    # the same reads: the request alone is the same text for both scorers, the fits differ
    assert result["token_padded"]["n_requests"] == result["token"]["n_requests"] == 3
    write_report({"config": config.model_dump(mode="json"), "recipes": {}, "token_dilution": result}, tmp_path)
    assert "padded training" in (tmp_path / "report.md").read_text()


def test_a_fold_holding_out_the_filler_uses_the_next_source_and_folds_share_padded_texts(
        datasets_dir: Path) -> None:
    config = tiny_config((AFTER,))
    pool = build_pool(datasets_dir, config.pool)
    padding = PADDING.model_copy(update={"filler_files": ("davidson_hate_offensive.jsonl", FILLER)})
    rows = {group: padded_rows(pool, make_fold(pool, group, AFTER, calibration_fraction=0.4), padding,
                               WordTokenizer(), datasets_dir, calibration_fraction=0.4)
            for group in ("tweets", "xstest", "forbidden_questions")}
    assert rows["tweets"].filler_file == FILLER  # davidson is the tweets group's: held out there
    assert rows["xstest"].filler_file == rows["forbidden_questions"].filler_file == "davidson_hate_offensive.jsonl"
    # a record padded in two folds is padded alike (same long text, read once): only held-out rows differ
    a, b = ({c[0].content for c, k in zip(r.conversations, r.kinds, strict=True) if k == "padded"}
            for r in (rows["xstest"], rows["forbidden_questions"]))
    assert len(a & b) >= 2
    assert [c for c, k in zip(rows["xstest"].conversations, rows["xstest"].kinds, strict=True) if k != "padded"] == [
        c for c, k in zip(rows["forbidden_questions"].conversations, rows["forbidden_questions"].kinds, strict=True)
        if k != "padded"]


@pytest.mark.usefixtures("torch_one_thread")
def test_comparison_adds_a_padded_row_per_fit(datasets_dir: Path, cache_dir: Path) -> None:
    config = tiny_config((AFTER,))
    fit = TokenScorerFit(window=4, epochs=20)
    padding = PADDING.model_copy(update={"filler_files": ("davidson_hate_offensive.jsonl", FILLER)})
    result = run_token_comparison(config, AFTER, cache_dir=cache_dir, datasets_dir=datasets_dir, fits=(fit,),
                                  layer=4, padding=padding, read_tokens=200)
    name = variant_name("maxmean", 4)
    for group, row in result["groups"].items():
        assert list(row) == ["mean-pooled probe", name, name + PADDED]
        assert row[name + PADDED]["n"] == row[name]["n"]
        assert row[name + PADDED]["filler_file"] == (FILLER if group == "tweets" else "davidson_hate_offensive.jsonl")
    assert result["mean"][name + PADDED]["groups_both_classes"] == 3 and result["read_tokens"] == 200
