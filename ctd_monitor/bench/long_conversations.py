"""``bench long-conversations``: a calibrated bundle's probe on long dialogues it never saw, read as the worker reads.

Benign ones are those of ``long_calibration.files`` past the ones the long cut was certified on; harmful ones are the
same files' long label-1 dialogues. Each is scored as the best of its views (``worker_scores``), and again reading its
user turns only, to show how much of the long-conversation gap is the assistant turns (docs/method.md §6c). With an
expert, the same dialogues are also scored as the guard scores a delegated one: read whole (``Expert.score`` on the
conversation, windows and all) at the expert's certified cut, and as its long cut was certified (by default the more
unsafe of the whole and its user turns alone: probes/experts/dialogue_read.py) at that cut: the guard's final verdict
on a long dialogue without and with ``guard.long_dialogue_cut``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import numpy.typing as npt

from probes.config import ExpertRead, Settings
from probes.conversation import user_turns_of
from probes.data import Record
from probes.evaluation.long_cut import LongConversations, long_conversations, worker_scores
from probes.experts.base import Expert
from probes.fitting.pipeline import score_in_chunks
from probes.metrics import classification_metrics
from probes.runtime.manifest import LongConversationCut
from probes.runtime.monitor import Monitor

F64 = npt.NDArray[np.float64]


def _flagged(scores: F64, cut: float) -> float | None:
    return round(float(np.mean(scores >= cut)), 4) if scores.size else None


def _rates(found: LongConversations, scores: F64, cuts: dict[str, float]) -> dict[str, Any]:
    by_file: dict[str, list[float]] = defaultdict(list)
    for record, score in zip(found.records, scores.tolist(), strict=True):
        by_file[record.file].append(score)
    return {"n": len(found.records), **{f"flagged_at_{name}": _flagged(scores, cut) for name, cut in cuts.items()},
            "per_file": {name: {"n": len(v), **{f"flagged_at_{c}": _flagged(np.asarray(v), cut)
                                                for c, cut in cuts.items()}} for name, v in sorted(by_file.items())}}


def _expert_scored(expert: Expert, cuts: dict[str, float], benign: LongConversations, unsafe: LongConversations,
                   read: ExpertRead) -> dict[str, Any]:
    b_benign, b_unsafe = (score_in_chunks(expert, found.records, lambda _n: None, read=read)
                          for found in (benign, unsafe))
    labels = np.r_[np.zeros(b_benign.size), np.ones(b_unsafe.size)]
    return {"cuts": cuts, "benign": _rates(benign, b_benign, cuts), "harmful": _rates(unsafe, b_unsafe, cuts),
            "whole": classification_metrics(labels, np.r_[b_benign, b_unsafe]) if b_benign.size and b_unsafe.size
            else None}


def _expert(expert: Expert, cut: float, long: LongConversationCut | None, benign: LongConversations,
            unsafe: LongConversations) -> dict[str, Any]:
    """Read whole at the expert's cut (the guard without ``guard.long_dialogue_cut``), and as its long cut was
    certified at the long cut (with it): under the same key when that reading is whole too."""
    long_cut = {"expert_long_cut": max(long.cut.cut, cut)} if long is not None else {}
    same_read = long is None or long.expert_read == "whole"
    out = {"expert": expert.name, "long_cut_read": long.expert_read if long is not None else None,
           **_expert_scored(expert, {"expert_cut": cut, **(long_cut if same_read else {})}, benign, unsafe, "whole")}
    if long is not None and not same_read:
        out[long.expert_read] = _expert_scored(expert, long_cut, benign, unsafe, long.expert_read)
    return out


def measure(settings: Settings, monitor: Monitor, trained_on: list[Record], *, held_out: int, harmful: int,
            user_turns: bool = True, expert: Expert | None = None) -> dict[str, Any]:
    """Flag rates of held-out long dialogues at the probe's cut and at its long cut; raises if either is missing,
    or if ``expert`` is given and the bundle certified no cut for it."""
    manifest = monitor.bundle.manifest
    long_cut, cut = manifest.long_probe_cut, manifest.long_unsafe_cut
    if long_cut is None or cut is None:
        raise ValueError("the bundle has no certified long-conversation cut: run `ctd-monitor calibrate` first")
    expert_cut = manifest.expert_cut(expert.name) if expert is not None else None
    if expert is not None and expert_cut is None:
        raise ValueError(f"the bundle has no certified cut for the expert {expert.name}: run `ctd-monitor calibrate`")
    config = settings.long_calibration
    if cut.files != list(config.files) or cut.seed != config.seed:
        raise ValueError(f"the long cut was certified on {cut.files} (seed {cut.seed}): configure long_calibration "
                         "so, or its dialogues would count as held out")
    # The first ``n`` in the seeded order certified the cut; the ones after them were never used.
    benign = long_conversations(settings, monitor, trained_on, limit=cut.cut.n + held_out).part(cut.cut.n)
    unsafe = long_conversations(settings, monitor, trained_on, label=1, limit=harmful)
    cuts = {"probe_cut": manifest.probe_cut, "long_cut": long_cut}
    p_benign, p_unsafe = worker_scores(monitor, benign.rows), worker_scores(monitor, unsafe.rows)
    labels = np.r_[np.zeros(p_benign.size), np.ones(p_unsafe.size)]
    out: dict[str, Any] = {
        "cuts": cuts, "certified_on": cut.cut.n, "epsilon": cut.cut.epsilon, "delta": cut.cut.delta,
        "benign": _rates(benign, p_benign, cuts), "harmful": _rates(unsafe, p_unsafe, cuts),
        "whole": classification_metrics(labels, np.r_[p_benign, p_unsafe]) if p_benign.size and p_unsafe.size
        else None,
    }
    if user_turns and p_benign.size and p_unsafe.size:
        rows = [monitor.tokenize_windows_batch([user_turns_of(r.messages) for r in found.records])
                for found in (benign, unsafe)]
        scores = [worker_scores(monitor, r) for r in rows]
        out["user_turns_only"] = {
            **classification_metrics(labels, np.concatenate(scores)),
            "benign_flagged_at_probe_cut": _flagged(scores[0], manifest.probe_cut),
            "harmful_flagged_at_probe_cut": _flagged(scores[1], manifest.probe_cut),
        }
    if expert is not None and expert_cut is not None:
        expert_long = manifest.expert_long_cut(expert.name)
        if expert_long is not None and (expert_long.cut.n, expert_long.files, expert_long.seed) != (
                cut.cut.n, cut.files, cut.seed):
            raise ValueError("the expert's long cut was certified on other dialogues than the probe's: calibrate again")
        # the benign dialogues are held out for the expert's long cut too: it was certified on the same first ``n``
        out["expert"] = _expert(expert, expert_cut.cut, expert_long, benign, unsafe)
    return out
