"""Tokenization cost of a streamed response per MB: the stream scorer's per-chunk bookkeeping with the model
replaced by zeros, so only tokenization, neutralisation and the roll-back checks are timed.

Run against any checkout (its ``probes`` first on the path), e.g. before/after:
    PYTHONPATH=/work/main python scripts/bench_stream_tokenize.py --kb 32 64 128
    PYTHONPATH=$PWD python scripts/bench_stream_tokenize.py --kb 32 64 128 1024
Prints one JSON line per size: seconds, seconds per MB, chunks.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from probes.activations.models import load_model
from probes.config import default_cache_dir
from probes.heads.inference import LinearHead
from probes.heads.token_probe import StreamSettings, TokenProbe
from probes.runtime.kv_store import KVStore
from probes.runtime.stream_scorer import StreamScorer

LAYER = 2
SENTENCE = "Stir the pot, add {i} grams of salt, then wait until it boils again; repeat as needed. "


class ZeroExtractor:
    """The parts of ``FeatureExtractor`` the stream scorer calls, returning zero states and a token-sized cache
    (held, so every chunk continues it as with the real model)."""

    def __init__(self, loaded: Any) -> None:
        self.loaded, self.layer, self.batch_tokens, self.max_items = loaded, LAYER, 1 << 30, 64
        self.zeros = torch.zeros(1 << 16, loaded.hidden_size)

    def packs_cached_batches(self) -> bool:
        return True

    def hidden_cached_batch(self, items: list[tuple[list[int], Any]]) -> list[tuple[torch.Tensor, Any]]:
        cache = ((torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)),)
        return [(self.zeros[: len(ids)], cache) for ids, _ in items]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kb", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--chunk-chars", type=int, default=256)
    args = parser.parse_args()
    loaded = load_model("smollm2-135m-instruct", cache_dir=default_cache_dir(), dtype="fp32", max_layer=LAYER)
    dim = loaded.hidden_size
    head = LinearHead(mean=np.zeros(dim, np.float32), scale=np.ones(dim, np.float32),
                      weight=np.zeros(dim, np.float32), bias=0.0)
    settings = StreamSettings(decay=0.8, window=4, aggregator="ema", score="peak", max_response_tokens=1 << 30,
                              holdback_tokens=2, thresholds={"ema": None}, alpha=None, delta=None)
    scorer = StreamScorer(ZeroExtractor(loaded), TokenProbe.from_head(head, LAYER, settings),  # type: ignore[arg-type]
                          prefix_max_tokens=256)
    text = "".join(SENTENCE.format(i=i) for i in range(200_000))
    for kb in args.kb:
        body = text[: kb * 1024]
        pieces = [body[i:i + args.chunk_chars] for i in range(0, len(body), args.chunk_chars)]
        state = scorer.open(())
        store = KVStore(max_bytes=1 << 40, max_entries=4)
        start = time.perf_counter()
        for n, piece in enumerate(pieces):
            scorer.feed("r", state, piece, final=n == len(pieces) - 1, store=store)
        seconds = time.perf_counter() - start
        print(json.dumps({"kb": kb, "chunks": len(pieces), "chunk_chars": args.chunk_chars,
                          "tokens": len(state.scored), "seconds": round(seconds, 3),
                          "seconds_per_mb": round(seconds / (len(body) / 2**20), 3)}), flush=True)


if __name__ == "__main__":
    main()
