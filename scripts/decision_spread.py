"""How far a bundle's score moves with the batch an event lands in, and how many events a decision margin re-scores.

The worker scores an event again when it lands near the unsafe cut (``worker.decision_logit_margin``, worker/
monitor.py ``_canonical_near_cut``), from its rows forwarded each on its own, so a redelivered duplicate gets the same
decision whatever batch it lands in. This measures what that margin must cover and what it costs, on the real model
and real data: each event scored in that canonical form and in ``--batchings`` random batchings (sizes 5 to 64, as
the worker's batches vary), the spread of the head's logit (the unit bf16 noise acts in: the heads are linear in
the pooled states) and of P(unsafe), the decisions that flip, and the share of events each margin would send back.

    PYTHONPATH=$PWD python scripts/decision_spread.py --bundle runs/demo/bundle --per-file 40 [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from probes.config import ModelConfig
from probes.data import read_file
from probes.heads.inference import logit
from probes.runtime.monitor import Monitor
from worker.monitor import decision_logit_margin

FILES = ("harmbench.jsonl", "xstest.jsonl", "alpaca_benign.jsonl", "coconot.jsonl", "hatecheck.jsonl",
         "convabuse.conversations.jsonl", "diasafety.conversations.jsonl", "tweeteval_offensive.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--datasets", type=Path, default=Path("../shared/datasets"))
    ap.add_argument("--files", default=",".join(FILES))
    ap.add_argument("--per-file", type=int, default=40)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batchings", type=int, default=3)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "ctd-monitor")
    args = ap.parse_args()

    monitor = Monitor(args.bundle, ModelConfig(dtype=args.dtype), cache_dir=args.cache_dir)
    records = []
    for name in args.files.split(","):
        part = read_file(args.datasets / name)
        random.Random(name).shuffle(part)
        records += part[: args.per_file]
    rows = monitor.tokenize_windows_batch([r.messages for r in records])
    # The worker's canonical form: each row forwarded on its own, the event at its highest row.
    alone = np.array([max(monitor.p_unsafe_of([[row]])[0] for row in r) for r in rows])
    again = np.array([max(monitor.p_unsafe_of([[row]])[0] for row in r) for r in rows])
    cut = monitor.unsafe_cut
    rng = random.Random(7)
    batched = []
    for _ in range(args.batchings):
        order = list(range(len(rows)))
        rng.shuffle(order)
        size = rng.choice([5, 16, 32, 64])
        out = np.empty(len(rows))
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            out[idx] = monitor.p_unsafe_of([rows[i] for i in idx])
        batched.append(out)
    b = np.stack(batched)
    d_logit = np.abs(logit(b) - logit(alone)[None, :]).max(axis=0)
    d_p = np.abs(b - alone[None, :]).max(axis=0)
    flipped = ((b >= cut) != (alone >= cut)[None, :]).any(axis=0)
    distance = np.abs(logit(alone) - logit(cut))
    margin = decision_logit_margin(None, monitor)
    report = {
        "bundle": str(args.bundle), "model": monitor.model_version, "dtype": str(monitor.loaded.dtype),
        "events": len(rows), "unsafe_cut": cut, "batchings": args.batchings,
        "logit_spread": {"max": float(d_logit.max()), "p99": float(np.quantile(d_logit, 0.99)),
                         "median": float(np.median(d_logit))},
        "p_spread": {"max": float(d_p.max()), "p99": float(np.quantile(d_p, 0.99)), "median": float(np.median(d_p))},
        "alone_twice_bitwise_equal": bool(np.array_equal(alone, again)),
        "decisions_flipped_without_rescore": int(flipped.sum()),
        "default_margin": margin,
        # a flip the worker would still answer differently: outside the margin, so not scored again alone
        "flips_outside_default_margin": int((flipped & (distance >= margin)).sum()),
        "share_rescored": {
            "p_margin_0.02": float(np.mean(np.abs(alone - cut) < 0.02)),
            **{f"logit_margin_{m}": float(np.mean(distance < m)) for m in (0.1, 0.25, 0.5, 0.75, 1.0)},
        },
        "flagged": float(np.mean(alone >= cut)),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
