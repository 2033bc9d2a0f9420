"""Two demo bundles' probes on the same held-out events: the former default data (18 files) against the broad set.

Each bundle is read with the recipe it was trained on (``--former`` on probes.config.DEFAULT_FILES without per-source
class balance, ``--broad`` on BROAD_FILES with it, both at the demo's per-source cap); the events are drawn as the
demo draws its replay (half harmful, spread evenly over the sources) from the former files and from the contrastive
files, leaving out every record either bundle trained or calibrated on. Each probe decides at its own certified cut.

    python scripts/demo_data_compare.py --former runs/demo-former/bundle --broad runs/demo/bundle [--events 500]

Prints one JSON row per (bundle, event set): AUROC, accuracy and the majority rate, recall, benign flag rate (fpr),
precision, F1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import orjson

from ctd_monitor.local.demo import DemoOptions, demo_settings, held_out_records
from probes.config import BROAD_FILES, CONTRASTIVE_FILES, DEFAULT_FILES, Settings, load_settings
from probes.fitting.pipeline import prepare_data
from probes.metrics import classification_metrics
from probes.runtime.monitor import Monitor


def recipe(settings: Settings, files: tuple[str, ...], balance: bool) -> Settings:
    data = settings.data.model_copy(update={"files": files, "class_balance_per_source": balance})
    return demo_settings(settings.model_copy(update={"data": data}), DemoOptions())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--former", type=Path, required=True, help="demo bundle trained on the former 18 files")
    parser.add_argument("--broad", type=Path, required=True, help="demo bundle trained on the broad set")
    parser.add_argument("--events", type=int, default=500, help="events drawn per set before leaving out seen ones")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    base: Settings = load_settings()
    recipes = {"former": recipe(base, DEFAULT_FILES, False), "broad": recipe(base, BROAD_FILES, True)}
    seen = {r.id for s in recipes.values() for r in prepare_data(s).dataset.records}
    sets = {name: [r for r in held_out_records(recipe(base, files, False), args.events, args.seed) if r.id not in seen]
            for name, files in (("former sources", DEFAULT_FILES), ("contrastive sources", CONTRASTIVE_FILES))}
    for name, path in (("former", args.former), ("broad", args.broad)):
        monitor = Monitor(path, base.model, cache_dir=base.cache_dir)
        for set_name, records in sets.items():
            p = monitor.bundle.heads["safety"].proba(monitor.extractor.pooled([r.messages for r in records],
                                                                               monitor.pooling))
            y = np.asarray([r.label for r in records])
            m = classification_metrics(y, p, threshold=monitor.unsafe_cut)
            print(orjson.dumps({"bundle": name, "events": set_name, "n": int(y.size), "cut": monitor.unsafe_cut,
                                "majority": float(max(y.mean(), 1 - y.mean())),
                                **{k: round(float(m[k]), 3) for k in
                                   ("auroc", "accuracy", "recall", "fpr", "precision", "f1")}}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
