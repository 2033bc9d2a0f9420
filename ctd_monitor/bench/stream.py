"""``bench stream``: incremental scoring (KV cache reused) against recomputing the whole prefix per chunk.

Same responses, same chunks, one run: each response's text is cut into ``chunks`` pieces of equal length; the
incremental side feeds them to ``StreamScorer`` (only new tokens run), the recompute side runs context +
response-so-far from scratch after every chunk, as a scorer without a cache must. Both read the bundle's
truncated model. ``batch`` responses stream side by side, and both sides batch them alike: chunk i of each
goes through ``score_chunks`` together (one pass over their caches), and the recompute side runs the group's
prefixes after chunk i through the same ``hidden_cached_batch``, with no cache (packed in one row where the
model's attention allows, else padded). Memory per open response: its KV cache bytes plus the small scorer
state, taken just before the last chunk (the largest an open response gets).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np

from probes.activations.batching import plan_batches
from probes.config import Settings
from probes.fitting.token_train import load_responses
from probes.heads.token_probe import TokenProbe
from probes.runtime.kv_store import KVStore, cache_nbytes
from probes.runtime.monitor import Monitor
from probes.runtime.response_text import prefix_ids, response_ids
from probes.runtime.stream_scorer import Chunk, StreamScorer


def split_text(text: str, chunks: int) -> list[str]:
    """``chunks`` consecutive pieces of (nearly) equal length that join back to ``text``."""
    bounds = np.linspace(0, len(text), chunks + 1).round().astype(int).tolist()
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def bench_stream(settings: Settings, bundle_dir: Path, files: list[Path] | None, n: int,
                 chunks: int = 8, batch: int = 1) -> dict[str, Any]:
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
    extractor = monitor.extractor

    def incremental(group: list[tuple[Any, str]]) -> list[tuple[float, int, int, int]]:
        store = KVStore(max_bytes=1 << 40, max_entries=2 * len(group))
        states = [scorer.open(context) for context, _ in group]
        pieces = [split_text(text, chunks) for _, text in group]
        kv, held = [0] * len(group), [0] * len(group)
        for i in range(chunks):
            if i == chunks - 1:
                kv = [cache_nbytes(store.get(f"r{j}")) for j in range(len(group))]
                held = [state.nbytes() for state in states]
            steps = scorer.score_chunks([Chunk(f"r{j}", state, pieces[j][i], i == chunks - 1)
                                         for j, state in enumerate(states)], store=store)
        recomputations.extend(state.recomputations for state in states)
        return [(step.peak, step.scored_tokens, k, h) for step, k, h in zip(steps, kv, held, strict=True)]

    def recompute(group: list[tuple[Any, str]]) -> list[tuple[float, int]]:
        """Context + response-so-far of every response of the group after each chunk, batched as the stream is."""
        prefixes = [prefix_ids(tok, context, monitor.max_tokens) for context, _ in group]
        pieces = [split_text(text, chunks) for _, text in group]
        seen = [""] * len(group)
        out = [(float("-inf"), 0)] * len(group)
        for i in range(chunks):
            todo: list[tuple[int, list[int]]] = []
            for j in range(len(group)):
                seen[j] += pieces[j][i]
                ids = response_ids(tok, seen[j])
                if i < chunks - 1:
                    ids = ids[: max(0, len(ids) - probe.settings.holdback_tokens)]
                if ids:
                    todo.append((j, ids))
            sequences = [prefixes[j] + ids for j, ids in todo]
            for indices in plan_batches([len(x) for x in sequences], batch_tokens=extractor.batch_tokens,
                                        max_items=extractor.max_items):
                # The batching the incremental side gets (packed where the model allows, else padded), so the
                # ratio is what reusing the cache saves, not a difference in how passes are filled.
                outputs = extractor.hidden_cached_batch([(sequences[i], None) for i in indices])
                for index, (hidden, _) in zip(indices, outputs, strict=True):
                    j, ids = todo[index]
                    start = len(prefixes[j])
                    aggregate = probe.new_aggregate()
                    aggregate.push(probe.logits(hidden[start : start + len(ids)].cpu().numpy()))
                    out[j] = aggregate.peak[probe.settings.aggregator], len(ids)
        return out

    groups = [items[i : i + batch] for i in range(0, len(items), batch)]
    incremental(groups[0])  # warm-up: first-call allocations are not what either side costs
    recompute(groups[0])
    del recomputations[:]
    gc.collect()
    inc: list[tuple[float, int, int, int]] = []
    rec: list[tuple[float, int]] = []
    t_inc = t_rec = 0.0
    for group in groups:
        # Interleaved per group, so a change in machine load hits both sides alike.
        t0 = time.perf_counter()
        inc.extend(incremental(group))
        t1 = time.perf_counter()
        rec.extend(recompute(group))
        t_inc += t1 - t0
        t_rec += time.perf_counter() - t1
    tokens = sum(x[1] for x in inc)
    peak_gap = max(abs(a[0] - b[0]) for a, b in zip(inc, rec, strict=True))
    kv = [x[2] for x in inc]
    state = [x[3] for x in inc]
    prefix_tokens = [len(prefix_ids(tok, c, monitor.max_tokens)) for c, _ in items]
    return {
        "responses": len(items), "chunks_per_response": chunks, "responses_per_pass": batch, "response_tokens": tokens,
        "mean_response_tokens": tokens / len(items), "mean_prefix_tokens": float(np.mean(prefix_tokens)),
        "incremental": {"seconds": t_inc, "tokens_per_s": tokens / t_inc},
        "recompute": {"seconds": t_rec, "tokens_per_s": tokens / t_rec},
        "speedup": t_rec / t_inc,
        "max_abs_peak_logit_gap": peak_gap,
        "retokenization_rescores": int(sum(recomputations)),
        "memory_per_open_response_bytes": {
            "kv_cache_mean": float(np.mean(kv)), "kv_cache_max": int(max(kv)),
            "state_mean": float(np.mean(state)), "state_max": int(max(state)),
            "total_mean": float(np.mean(kv) + np.mean(state)),
        },
        "batching": "packed" if extractor.packs_cached_batches() else "padded",
        "model": monitor.model_version, "layers_run": monitor.loaded.max_layer, "device": str(monitor.loaded.device),
        "dtype": str(monitor.loaded.dtype).removeprefix("torch."),
    }
