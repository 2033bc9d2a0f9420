"""Loaded by the hostile suite's worker child only (its PYTHONPATH): makes the probe score NaN for any event whose
text holds NAN_TRIGGER, the simulated NaN-producing input of issue 14. Nothing in the shipped code knows of it."""

from __future__ import annotations

import math
from typing import Any


def _install() -> None:
    import numpy as np

    from probes.runtime.monitor import Monitor, Scores

    real = Monitor.score_grouped

    def score_grouped(self: Monitor, batches: Any, groups: Any, n: int, **kwargs: Any) -> Scores:
        scores = real(self, batches, groups, n, **kwargs)
        p = scores.p_unsafe.copy()
        for batch in batches:
            for position, row in enumerate(batch.indices):
                text = self.loaded.tokenizer.decode(batch.input_ids[position].tolist())
                if "NAN_TRIGGER" in text.replace(" ", "").upper():
                    p[groups[row]] = math.nan
        return Scores(np.asarray(p), scores.dv, scores.signal, scores.features)

    Monitor.score_grouped = score_grouped  # type: ignore[method-assign]


_install()
