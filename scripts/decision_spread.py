"""How far a bundle's score moves with the batch an event lands in, and how many events a decision margin re-scores.

The worker scores an event again when it lands near the unsafe cut (``worker.decision_logit_margin``, worker/
monitor.py ``_canonical_near_cut``), from its rows forwarded each on its own, so a redelivered duplicate gets the same
decision whatever batch it lands in; the guard does the same for a review request near its expert's cut
(``guard.decision_logit_margin``: the request in a batch of its own). This measures what each margin must cover and
what it costs, on the real model and real data: each item scored in its canonical form and in ``--batchings`` random
batchings (as the service's batches vary), the spread of the logit (the unit bf16 noise acts in: the heads are
linear in the pooled states) and of P(unsafe), the decisions that flip, and the share each margin sends back.

    PYTHONPATH=$PWD python scripts/decision_spread.py --bundle runs/demo/bundle --per-file 40 [--dtype bf16]
    PYTHONPATH=$PWD python scripts/decision_spread.py --bundle runs/demo/bundle --expert --batchings 4  # the guard's
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from probes.config import ModelConfig
from probes.data import read_file
from probes.experts.encoder_head import EncoderHeadExpert
from probes.heads.inference import logit
from probes.runtime.bundle import load_bundle
from probes.runtime.monitor import Monitor
from worker.config import GuardConfig
from worker.monitor import decision_logit_margin

F64 = npt.NDArray[np.float64]

FILES = ("harmbench.jsonl", "xstest.jsonl", "alpaca_benign.jsonl", "coconot.jsonl", "hatecheck.jsonl",
         "convabuse.conversations.jsonl", "diasafety.conversations.jsonl", "tweeteval_offensive.jsonl")


def spread(canonical: Callable[[int], float], batched: Callable[[list[int]], F64], n: int, cut: float,
           margin: float, batchings: int, sizes: Sequence[int]) -> dict[str, Any]:
    """Item ``i`` scored in its canonical form (twice) and in ``batchings`` random batchings of ``sizes``."""
    alone = np.array([canonical(i) for i in range(n)])
    again = np.array([canonical(i) for i in range(n)])
    rng = random.Random(7)
    runs = []
    for _ in range(batchings):
        order = list(range(n))
        rng.shuffle(order)
        size = rng.choice(list(sizes))
        out = np.empty(n)
        for start in range(0, n, size):
            idx = order[start:start + size]
            out[idx] = batched(idx)
        runs.append(out)
    b = np.stack(runs)
    d_logit = np.abs(logit(b) - logit(alone)[None, :]).max(axis=0)
    d_p = np.abs(b - alone[None, :]).max(axis=0)
    flipped = ((b >= cut) != (alone >= cut)[None, :]).any(axis=0)
    distance = np.abs(logit(alone) - logit(cut))
    return {
        "items": n, "cut": cut, "batchings": batchings, "batch_sizes": list(sizes),
        "logit_spread": {"max": float(d_logit.max()), "p99": float(np.quantile(d_logit, 0.99)),
                         "median": float(np.median(d_logit))},
        "p_spread": {"max": float(d_p.max()), "p99": float(np.quantile(d_p, 0.99)), "median": float(np.median(d_p))},
        "alone_twice_bitwise_equal": bool(np.array_equal(alone, again)),
        "decisions_flipped_without_rescore": int(flipped.sum()),
        "default_margin": margin,
        # a flip the service would still answer differently: outside the margin, so not scored again
        "flips_outside_default_margin": int((flipped & (distance >= margin)).sum()),
        "share_rescored": {
            "p_margin_0.02": float(np.mean(np.abs(alone - cut) < 0.02)),
            **{f"logit_margin_{m}": float(np.mean(distance < m)) for m in (0.1, 0.25, 0.5, 0.75, 1.0)},
        },
        "flagged": float(np.mean(alone >= cut)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--expert", action="store_true", help="measure the bundle's encoder-head expert as the guard "
                    "batches it (batches of 4-16, canonical: a request alone) instead of the probe")
    ap.add_argument("--datasets", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--files", default=",".join(FILES))
    ap.add_argument("--per-file", type=int, default=40)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batchings", type=int, default=3)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "ctd-monitor")
    args = ap.parse_args()

    records = []
    for name in args.files.split(","):
        part = read_file(args.datasets / name)
        random.Random(name).shuffle(part)
        records += part[: args.per_file]
    if args.expert:
        manifest = load_bundle(args.bundle).manifest
        if manifest.expert is None or manifest.expert_unsafe_cut is None:
            raise SystemExit(f"{args.bundle}: no expert with a certified cut in this bundle")
        expert = EncoderHeadExpert(Path(manifest.expert.path), dtype=args.dtype)
        conversations = [r.messages for r in records]
        report = spread(lambda i: float(expert.score([conversations[i]])[0]),
                        lambda idx: expert.score([conversations[i] for i in idx]), len(conversations),
                        manifest.expert_unsafe_cut.cut, GuardConfig().decision_logit_margin, args.batchings,
                        (4, 8, 16))
        print(json.dumps({"expert": expert.name, "dtype": str(expert.model.dtype), **report}, indent=2))
        return
    monitor = Monitor(args.bundle, ModelConfig(dtype=args.dtype), cache_dir=args.cache_dir)
    rows = monitor.tokenize_windows_batch([r.messages for r in records])
    # The worker's canonical form: each row forwarded on its own, the event at its highest row.
    report = spread(lambda i: max(float(monitor.p_unsafe_of([[row]])[0]) for row in rows[i]),
                    lambda idx: monitor.p_unsafe_of([rows[i] for i in idx]), len(rows), monitor.unsafe_cut,
                    decision_logit_margin(None, monitor), args.batchings, (5, 16, 32, 64))
    print(json.dumps({"bundle": str(args.bundle), "model": monitor.model_version, "dtype": str(monitor.loaded.dtype),
                      **report}, indent=2))


if __name__ == "__main__":
    main()
