from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from probes.evaluation.generalization.folds import BROAD, LosoConfig
from probes.evaluation.generalization.heads_compare import HeadsConfig, head_flops, heads_markdown, run_heads
from probes.evaluation.generalization.pool import PoolConfig, SourceGroup
from probes.fitting.block_head import BlockTraining, block_flops_per_token
from tests.conftest import share_models

GROUPS = (
    SourceGroup(name="xstest", files=("xstest.jsonl",)),
    SourceGroup(name="sexism", files=("edos.jsonl",)),
    SourceGroup(name="harmful_behaviors", files=("advbench.jsonl", "harmbench.jsonl")),
    SourceGroup(name="alpaca", files=("alpaca_benign.jsonl",)),
)


def _config() -> LosoConfig:
    recipe = BROAD.model_copy(update={"epsilon": 0.3})
    return LosoConfig(pool=PoolConfig(groups=GROUPS, per_file=12, per_file_overrides={"alpaca_benign.jsonl": 30}),
                      recipes=(recipe,), probe_spec="smollm2-135m-instruct", probe_max_tokens=24, dtype="fp32",
                      calibration_fraction=0.4)


def test_heads_share_folds_and_block_at_zero_epochs_is_the_linear_probe(
        tmp_path: Path, datasets_dir: Path, cache_dir: Path) -> None:
    share_models(tmp_path, cache_dir, "smollm2-135m-instruct")
    config = _config()
    still = HeadsConfig(block=3, training=BlockTraining(epochs=0))
    report = run_heads(config, still, cache_dir=tmp_path, datasets_dir=datasets_dir)
    assert report["computed"]["block_input_records"] == report["pool"]["n"]
    run = report["recipes"]["broad"]
    assert set(run["groups"]) == {g.name for g in GROUPS}
    for name, row in run["groups"].items():
        assert row["linear"]["n"] == row["mlp"]["n"] == row["block"]["n"]
        # no training: the block head is the logistic head on the frozen block's pooled states, cut alike
        assert row["block"]["cut"] == row["linear"]["cut"], name
        for metric in ("auroc", "accuracy", "fpr", "recall"):
            a, b = row["block"][metric], row["linear"][metric]
            assert (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-6, (name, metric)
    assert run["mean"]["linear"]["groups_both_classes"] == 2  # xstest and sexism hold both classes
    assert not math.isnan(run["mean"]["linear"]["recall_harmful_only"])
    assert not math.isnan(run["mean"]["mlp"]["fpr_benign_only"])
    text = heads_markdown(report)
    assert text.count("| sexism |") == 1 and "block AUROC" in text

    trained = HeadsConfig(heads=("linear", "block"), block=3,
                          training=BlockTraining(epochs=2, train_tokens=12, block_lr=1e-3))
    again = run_heads(config, trained, cache_dir=tmp_path, datasets_dir=datasets_dir)
    assert again["computed"]["block_input_records"] == 0  # every state read from the cache
    rows = again["recipes"]["broad"]["groups"]
    assert all(len(r["block"]["epoch_losses"]) == 2 for r in rows.values())
    assert "mlp" not in rows["xstest"]
    assert any(abs(r["block"]["auroc"] - r["linear"]["auroc"]) > 1e-6 for r in rows.values()
               if not math.isnan(r["linear"]["auroc"]))  # training moved the scores


def test_head_flops_put_each_head_beside_the_monitored_pass() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                         head_dim=64)
    flops = head_flops(config, block=15, mean_tokens=71.0, mlp_hidden=(256,))
    one_block = block_flops_per_token(config, context=36.0)
    assert flops["block_per_token"] == one_block and flops["monitored_pass_per_token"] == 15 * one_block
    assert flops["linear"] == np.float64(576 + 4 * 576 / 71.0)
    assert flops["mlp"] == 576 + (2 * 576 + 2 * 576 * 256 + 2 * 256) / 71.0
    assert flops["linear"] < flops["mlp"] < flops["block"] < flops["monitored_pass_per_token"]
    assert flops["block_replacing_probe_layer"] == flops["linear"]
