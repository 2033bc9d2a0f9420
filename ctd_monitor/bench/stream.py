"""``bench stream``: incremental scoring (KV cache reused) against recomputing the whole prefix per chunk.

Same responses, same chunks, one run: each response's text is cut into ``chunks`` pieces of equal length; the
incremental side feeds them to ``StreamScorer`` (only new tokens run), the recompute side runs context +
response-so-far from scratch after every chunk, as a scorer without a cache must. Both read the bundle's
truncated model. Memory per open response: its KV cache bytes plus the small scorer state, taken just before
the last chunk (the largest an open response gets).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np

from probes.config import Settings
from probes.monitor import Monitor
from probes.stream_scorer import KVStore, StreamScorer, cache_nbytes, prefix_ids, response_ids
from probes.token_probe import TokenProbe
from probes.token_train import load_responses


def split_text(text: str, chunks: int) -> list[str]:
    """``chunks`` consecutive pieces of (nearly) equal length that join back to ``text``."""
    bounds = np.linspace(0, len(text), chunks + 1).round().astype(int).tolist()
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def bench_stream(settings: Settings, bundle_dir: Path, files: list[Path] | None, n: int,
                 chunks: int = 8) -> dict[str, Any]:
    monitor = Monitor(bundle_dir, settings.model, cache_dir=settings.cache_dir)
    probe = TokenProbe.from_bundle(monitor.bundle)
    # Throughput only: no threshold, so no response stops early and both sides read every token.
    probe = dataclasses.replace(probe, settings=dataclasses.replace(
        probe.settings, thresholds=dict.fromkeys(probe.settings.thresholds)))
    scorer = StreamScorer(monitor.extractor, probe, prefix_max_tokens=monitor.max_tokens)
    tok = monitor.loaded.tokenizer
    _, splits = load_responses(settings, files)
    records = list(splits.evaluation)[:n]
    cap = probe.settings.max_response_tokens
    # Texts cut to the tokens the scorer reads, so neither side does work the other skips.
    items = [(r.messages[:-1], tok.decode(response_ids(tok, r.messages[-1].content)[:cap])) for r in records]
    items = [(c, t) for c, t in items if t]

    recomputations: list[int] = []

    def incremental(context: Any, text: str) -> tuple[float, int, int, int]:
        store = KVStore(max_bytes=1 << 40, max_entries=8)
        state = scorer.open(context)
        kv = held = 0
        for i, piece in enumerate(split_text(text, chunks)):
            if i == chunks - 1:
                kv, held = cache_nbytes(store.get("r")), state.nbytes()
            step = scorer.feed("r", state, piece, final=i == chunks - 1, store=store)
        recomputations.append(state.recomputations)
        return step.peak, step.scored_tokens, kv, held

    def recompute(context: Any, text: str) -> tuple[float, int]:
        prefix = prefix_ids(tok, context, monitor.max_tokens)
        seen = ""
        for i, piece in enumerate(split_text(text, chunks)):
            seen += piece
            ids = response_ids(tok, seen)
            if i < chunks - 1:
                ids = ids[: max(0, len(ids) - probe.settings.holdback_tokens)]
            if not ids:
                continue
            hidden, _ = scorer.states(prefix + ids)
            aggregate = probe.new_aggregate()
            aggregate.push(probe.logits(hidden[len(prefix):]))
        return aggregate.peak[probe.settings.aggregator], len(ids)

    incremental(*items[0])  # warm-up: first-call allocations are not what either side costs
    recompute(*items[0])
    gc.collect()
    inc, rec = [], []
    t_inc = t_rec = 0.0
    for context, text in items:
        # Interleaved per response, so a change in machine load hits both sides alike.
        t0 = time.perf_counter()
        inc.append(incremental(context, text))
        t1 = time.perf_counter()
        rec.append(recompute(context, text))
        t_inc += t1 - t0
        t_rec += time.perf_counter() - t1
    tokens = sum(x[1] for x in inc)
    peak_gap = max(abs(a[0] - b[0]) for a, b in zip(inc, rec, strict=True))
    kv = [x[2] for x in inc]
    state = [x[3] for x in inc]
    prefix_tokens = [len(prefix_ids(tok, c, monitor.max_tokens)) for c, _ in items]
    return {
        "responses": len(items), "chunks_per_response": chunks, "response_tokens": tokens,
        "mean_response_tokens": tokens / len(items), "mean_prefix_tokens": float(np.mean(prefix_tokens)),
        "incremental": {"seconds": t_inc, "tokens_per_s": tokens / t_inc},
        "recompute": {"seconds": t_rec, "tokens_per_s": tokens / t_rec},
        "speedup": t_rec / t_inc,
        "max_abs_peak_logit_gap": peak_gap,
        "retokenization_rescores": int(sum(recomputations[1:])),  # the first is the warm-up run
        "memory_per_open_response_bytes": {
            "kv_cache_mean": float(np.mean(kv)), "kv_cache_max": int(max(kv)),
            "state_mean": float(np.mean(state)), "state_max": int(max(state)),
            "total_mean": float(np.mean(kv) + np.mean(state)),
        },
        "model": monitor.model_version, "layers_run": monitor.loaded.max_layer, "device": str(monitor.loaded.device),
        "dtype": str(monitor.loaded.dtype).removeprefix("torch."),
    }
