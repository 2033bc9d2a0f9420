"""``bench heads``: what the probe and DV heads cost next to the activation extraction they read.

Same batches as the worker builds (token budget from ``batching``); per batch, extraction is the
truncated forward pass + pooling + copy to host, heads is ``head_scores`` (safety probe, DV head, the
delegation signal) on the pooled features — exactly the worker's two steps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctd_monitor.bench.gpu import GpuSampler
from probes.activations.batching import plan_batches
from probes.activations.features import TokenBatch
from probes.data import read_file
from probes.runtime.monitor import Monitor, head_scores
from worker.config import WorkerSettings


def _sync(monitor: Monitor) -> None:
    if monitor.loaded.device.type == "cuda":
        torch.cuda.synchronize(monitor.loaded.device)


def token_batches(monitor: Monitor, texts: Sequence[Any],
                  settings: WorkerSettings) -> tuple[list[list[int]], list[TokenBatch], int]:
    """The worker's batches for these conversations (token budget, longest first): the positions of each
    batch's items, the collated batches, and the real token count."""
    ids = [monitor.tokenize(c) for c in texts]
    b = settings.batching
    plan = plan_batches([len(x) for x in ids], batch_tokens=b.max_batch_tokens, max_items=b.max_items)
    return plan, [monitor.collate([ids[i] for i in batch]) for batch in plan], sum(len(x) for x in ids)


def bench_heads(settings: WorkerSettings, files: Sequence[Path], n: int, repeats: int = 3) -> dict[str, Any]:
    monitor = Monitor(settings.worker.bundle, settings.model, cache_dir=settings.cache_dir)
    records = [r for path in files for r in read_file(path)][:n]
    _, batches, tokens = token_batches(monitor, [r.messages for r in records], settings)
    signal = monitor.rule.signal
    head_scores(monitor.bundle, monitor.features(batches[0]), signal)  # warm-up (allocations, kernels)
    extraction, heads = [], []
    with GpuSampler(monitor.loaded.device) as gpu:
        for _ in range(repeats):
            for batch in batches:
                _sync(monitor)
                t0 = time.perf_counter()
                features = monitor.features(batch)  # ends with the copy to host: synchronous on CUDA too
                t1 = time.perf_counter()
                head_scores(monitor.bundle, features, signal)
                t2 = time.perf_counter()
                extraction.append(t1 - t0)
                heads.append(t2 - t1)
    ext, hd = float(np.sum(extraction)), float(np.sum(heads))
    events = len(records) * repeats
    return {
        "n": len(records), "repeats": repeats, "batches": len(batches), "tokens": tokens,
        "model": monitor.model_version, "device": str(monitor.loaded.device), "dtype": str(monitor.loaded.dtype),
        "layers_run": monitor.loaded.max_layer, "hidden_size": monitor.loaded.hidden_size,
        "heads": sorted(monitor.bundle.heads), "signal": signal, "torch_threads": torch.get_num_threads(),
        "max_batch_tokens": settings.batching.max_batch_tokens,
        "extraction_seconds": ext, "heads_seconds": hd,
        "extraction_ms_per_batch_p50": 1000 * float(np.median(extraction)),
        "heads_ms_per_batch_p50": 1000 * float(np.median(heads)),
        "heads_us_per_event": 1e6 * hd / events,
        "overhead_ratio": hd / ext,
        "gpu": gpu.summary(),
    }
