"""A learned attention pooling against mean pooling under leave-source-out (issue 12, point 3).

The probe's features are one pooled vector per conversation. This asks whether a pooling *learned* on the
training groups (a softmax over the tokens of one learned query, then a logistic head on the weighted mean of the
standardised token states) ranks unseen groups better than the shipped mean pooling. For every held-out group
with both classes it trains both on the fold's fit rows (``probes.evaluation.generalization.folds.make_fold``, the ``after``
recipe's rows and weights) and prints held-out AUROC as JSON lines, then the means.

    python scripts/attention_pooling_loso.py [--per-file 100] [--layer 15] [--epochs 30]

Token states are held in memory (bf16, ≤ 256 tokens each: ~0.7 GB for the default pool of 2406 records), so
nothing is cached: the first forward pass is the bulk of the time (about 10 minutes on 2 shared cores).
"""

from __future__ import annotations

import argparse

import numpy as np
import orjson
import torch
from sklearn.metrics import roc_auc_score

from probes.activations.features import FeatureExtractor
from probes.activations.models import load_model
from probes.config import load_settings
from probes.evaluation.generalization.folds import AFTER, LosoConfig, make_fold
from probes.evaluation.generalization.pool import PoolConfig, build_pool
from probes.evaluation.generalization.scoring import fit_head


class AttentionProbe(torch.nn.Module):
    """logit = w · Σ_t softmax_t(q · z_t) z_t + b over the standardised token states z_t."""

    def __init__(self, width: int, mean: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.query = torch.nn.Linear(width, 1)
        self.head = torch.nn.Linear(width, 1)
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = (states.float() - self.mean) / self.scale
        weights = self.query(z).squeeze(-1).masked_fill(~mask, -1e9).softmax(-1)
        return self.head((weights[..., None] * z).sum(1)).squeeze(-1)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-file", type=int, default=100)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    settings = load_settings()
    config = LosoConfig(pool=PoolConfig(per_file=args.per_file))
    pool = build_pool(settings.data.datasets_dir, config.pool)
    y = np.asarray([p.record.label for p in pool], dtype=np.int64)

    loaded = load_model(settings.model.spec, cache_dir=settings.cache_dir, dtype="auto", max_layer=args.layer)
    extractor = FeatureExtractor(loaded, layer=args.layer, max_tokens=args.max_tokens, batch_tokens=8192,
                                 max_items=64)
    token_states = extractor.token_states([p.record.messages for p in pool])
    width = token_states[0].shape[1]
    states = torch.zeros(len(pool), args.max_tokens, width, dtype=torch.bfloat16)
    mask = torch.zeros(len(pool), args.max_tokens, dtype=torch.bool)
    for i, s in enumerate(token_states):
        n = min(args.max_tokens, len(s))
        states[i, :n] = torch.from_numpy(s[-n:]).to(torch.bfloat16)
        mask[i, :n] = True
    mean_pooled = (states.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    recipe = AFTER.model_copy(update={"variants": ((args.layer, "mean"),)})

    def train(rows: np.ndarray, weights: np.ndarray) -> AttentionProbe:
        torch.manual_seed(0)
        pooled = mean_pooled[torch.as_tensor(rows)]
        model = AttentionProbe(width, pooled.mean(0), pooled.std(0) + 1e-4)
        optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
        labels = torch.tensor(y[rows], dtype=torch.float32)
        w = torch.tensor(weights / weights.mean(), dtype=torch.float32)
        for _ in range(args.epochs):
            order = torch.randperm(len(rows))
            for start in range(0, len(rows), 64):
                idx = order[start:start + 64]
                r = torch.as_tensor(rows)[idx]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    model(states[r], mask[r]), labels[idx], reduction="none")
                optimiser.zero_grad()
                (loss * w[idx]).mean().backward()
                optimiser.step()
        return model

    rows_out = []
    for group in config.pool.groups:
        fold = make_fold(pool, group.name, recipe, calibration_fraction=config.calibration_fraction)
        test = fold.test
        if not 0 < y[test].mean() < 1 or len(np.unique(y[fold.fit])) < 2:
            continue
        mean_head = fit_head(mean_pooled.numpy()[fold.fit], y[fold.fit], fold.weights, recipe.c, 0)
        model = train(fold.fit, fold.weights)
        with torch.no_grad():
            scores = torch.cat([model(states[torch.as_tensor(test[i:i + 128])], mask[torch.as_tensor(test[i:i + 128])])
                                for i in range(0, len(test), 128)]).numpy()
        row = {"group": group.name, "n": len(test), "mean_pooling_auroc": roc_auc_score(y[test],
                                                                                         mean_head.proba(mean_pooled.numpy()[test])),
               "attention_pooling_auroc": roc_auc_score(y[test], scores)}
        rows_out.append(row)
        print(orjson.dumps(row).decode(), flush=True)
    print(orjson.dumps({"mean": {k: float(np.mean([r[k] for r in rows_out]))
                                 for k in ("mean_pooling_auroc", "attention_pooling_auroc")},
                        "per_file": args.per_file, "layer": args.layer, "epochs": args.epochs}).decode())


if __name__ == "__main__":
    main()
