"""Where does a padded request's token score come from: its own tokens or the filler's? (docs/generalization.md,
"Padded training at the read bound")

Fits the padded token scorer exactly as ``bench generalization --token-dilution 20 --token-padding`` does (the
dilution fold of the broad pool, ``TokenPadding``'s defaults, maxmean w16), reads the yardstick's 20 held-out
requests alone and with ``--length`` Alpaca filler tokens before, after and around them (the yardstick's own
texts, ``dilution.transformations``), and splits each padded score into the max of the rolling means that end
inside the request's tokens (and the chat template's closing tokens) and the max over the filler's. Prints one
JSON object: per placement, mean P of each part, the share of requests whose padded score is set by the filler
and whose own part moved by more than the yardstick's 0.1.

    PYTHONPATH=$PWD python scripts/token_padding_split.py --length 3072
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from probes.activations.features import FeatureExtractor
from probes.activations.models import load_model
from probes.config import WindowConfig, default_cache_dir, default_datasets_dir
from probes.conversation import single_turn
from probes.data import read_file
from probes.evaluation.dilution import FILLER_FILE, FillerSource, held_out_requests, transformations
from probes.evaluation.generalization.folds import BROAD, LosoConfig, make_fold
from probes.evaluation.generalization.pool import BROAD_GROUPS, build_pool
from probes.evaluation.generalization.token_dilution import REQUEST_GROUP, training_fold
from probes.evaluation.generalization.token_padding import TokenPadding, fit_padded
from probes.evaluation.generalization.token_scorer import fill_token_states
from probes.fitting.token_scorer import TokenScorerFit
from probes.heads.inference import sigmoid
from probes.heads.token_probe import rolling_means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=3072)
    parser.add_argument("--n", type=int, default=20)
    args = parser.parse_args()
    cache_dir, datasets_dir = default_cache_dir(), default_datasets_dir()
    config = LosoConfig()
    config = config.model_copy(update={"pool": config.pool.model_copy(update={"groups": BROAD_GROUPS})})
    recipe = BROAD.model_copy(update={"variants": ((15, "mean"),)})
    pool = build_pool(datasets_dir, config.pool)
    read_pool = fill_token_states(cache_dir, pool, layer=15, spec=config.probe_spec,
                                  max_tokens=config.probe_max_tokens, dtype=config.dtype)
    y = np.asarray([p.record.label for p in pool], dtype=np.int64)
    fold = training_fold([p.record.file for p in pool], make_fold(
        pool, REQUEST_GROUP, recipe, calibration_fraction=config.calibration_fraction, seed=config.seed))
    loaded = load_model(config.probe_spec, cache_dir=cache_dir, dtype=config.dtype, max_layer=15)
    extractor = FeatureExtractor(loaded, layer=15, max_tokens=4096, batch_tokens=4096, max_items=8)
    got = fit_padded(pool, fold, read_pool.states, y, TokenScorerFit(), TokenPadding(), extractor, recipe=recipe,
                     config=config, cache_dir=cache_dir, datasets_dir=datasets_dir, skip=read_pool.prefix)
    scorer = got.scorer
    trained = sorted({pool[i].record.file for i in (*fold.fit, *fold.calibration)})
    requests, _ = held_out_requests(datasets_dir, trained, args.n, seed=0)
    filler = FillerSource(loaded.tokenizer, [r.messages[0].content for r in
                                             read_file(Path(datasets_dir) / FILLER_FILE)[:2000]])
    out: dict[str, object] = {"cut": got.cut, "length": args.length}
    variants = [transformations(r, filler, (args.length,), WindowConfig(), i) for i, r in enumerate(requests)]
    alone = [scorer.token_logits(scorer.content(s)) for s in
             extractor.token_states([single_turn(v["alone"]) for v in variants])]
    p_alone = np.asarray([sigmoid(np.asarray([rolling_means(z, scorer.window).max()]))[0] for z in alone])
    for place in ("before", "after", "around"):
        name = f"{place}_{args.length}"
        own, rest, whole = [], [], []
        for z_alone, states in zip(alone, extractor.token_states([single_turn(v[name]) for v in variants]),
                                   strict=True):
            z = scorer.token_logits(scorer.content(states))
            means = rolling_means(z, scorer.window)
            n = len(z_alone)  # the request and the template's closing tokens: where they sit in the padded text
            lead = {"before": len(z) - n, "after": 0, "around": None}[place]
            if lead is None:  # the request's place: where its own logits match best (one offset per request)
                lead = min(range(len(z) - n + 1), key=lambda k: float(np.abs(z[k:k + n] - z_alone).mean()))
            inside = np.zeros(len(z), dtype=bool)
            inside[lead:lead + n] = True
            own.append(float(means[inside].max()))
            rest.append(float(means[~inside].max()) if (~inside).any() else float("-inf"))
            whole.append(float(means.max()))
        p_own, p_rest, p_whole = (sigmoid(np.asarray(v)) for v in (own, rest, whole))
        out[place] = {"mean_p_alone": float(p_alone.mean()), "mean_p_padded": float(p_whole.mean()),
                      "mean_p_request_part": float(p_own.mean()), "mean_p_filler_part": float(p_rest.mean()),
                      "set_by_filler": float(np.mean(p_rest > p_own)),
                      "request_part_moved_over_0.1": float(np.mean(np.abs(p_own - p_alone) > 0.1)),
                      "filler_part_over_alone_plus_0.1": float(np.mean(p_rest > p_alone + 0.1))}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
