"""The probe's unsafe cut for long conversations, certified on long benign conversations read as the worker reads.

The worker scores a conversation longer than ``max_tokens`` as the best of its views (the kept tail and the
windows, probes/activations/windows.py): up to 17 chances to cross the cut instead of one. The calibration split
is mostly single requests, so the cut certified there bounded nothing on long traffic: measured on a demo bundle
(ε = 0.08), 70 % of held-out long benign dialogues were flagged (docs/method.md §6c).

So long dialogues (``is_long_dialogue``) get a cut of their own, certified by the same test
(``calibrate_unsafe_cut``) on long benign dialogues of ``long_calibration.files`` that the bundle never trained on,
each scored through the runtime ``Monitor`` (the worker's code path). They are taken in a seeded order; the first
``max_conversations`` certify, the rest stay unseen for ``bench long-conversations``. The worker applies the cut
only where the operator chooses it (``worker.long_dialogue_cut``): on these dialogues the probe hardly separates
the classes, so the certified cut also drops most harmful ones (docs/method.md §6c).

The expert has the same gap (it reads a long conversation in windows and keeps the most unsafe) and its verdict on a
delegated event is final, so the same dialogues certify a long cut for it too, scored as the guard scores them
(``Expert.score``, and by default its user turns alone too: probes/experts/dialogue_read.py); the guard applies it
where ``guard.long_dialogue_cut`` says, reading as the cut records.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from probes.activations.normalise import normalise
from probes.cache import sha256_text
from probes.calibration.ltt import calibrate_unsafe_cut
from probes.config import LongCalibrationConfig, Settings
from probes.data import Record, read_file, resolve_paths
from probes.experts.base import Expert
from probes.fitting.pipeline import score_in_chunks
from probes.logs import get_logger
from probes.runtime.manifest import LongConversationCut
from probes.runtime.monitor import Monitor

log = get_logger(__name__)

#: Conversations tokenized or scored per call: bounds memory, not results.
CHUNK = 32


@dataclass(frozen=True)
class LongConversations:
    """Long conversations of the configured files and their worker rows, in the seeded order."""

    records: list[Record]
    rows: list[list[list[int]]]
    considered: int  # long dialogues of the files with the label, after those the bundle trained on were dropped

    def part(self, start: int, stop: int | None = None) -> LongConversations:
        return LongConversations(self.records[start:stop], self.rows[start:stop], self.considered)


def _texts(records: Sequence[Record]) -> set[str]:
    return {normalise(m.content).strip() for r in records for m in r.messages if m.role == "user"}


def long_conversations(settings: Settings, monitor: Monitor, trained_on: Sequence[Record], *, label: int = 0,
                       limit: int | None = None) -> LongConversations:
    """Conversations of ``settings.long_calibration.files`` with ``label`` that are long dialogues as the worker
    reads them (``is_long_dialogue``; benign ones certify the long cut, harmful ones only measure it).

    A conversation sharing a user turn with ``trained_on`` (the bundle's data) is dropped: the probe has seen it,
    so its score would understate the flag rate. At most ``limit`` are collected (None: all).
    """
    config: LongCalibrationConfig = settings.long_calibration
    seen = _texts(trained_on)
    candidates = [r for path in resolve_paths(settings.data.datasets_dir, config.files) for r in read_file(path)
                  if r.label == label and monitor.is_long_dialogue(r.messages) and not _texts([r]) & seen]
    candidates.sort(key=lambda r: sha256_text(str(config.seed), r.file, r.id))
    records = candidates[:limit]
    rows = [views for start in range(0, len(records), CHUNK)
            for views in monitor.tokenize_windows_batch([r.messages for r in records[start : start + CHUNK]])]
    return LongConversations(records, rows, len(candidates))


def worker_scores(monitor: Monitor, rows: Sequence[list[list[int]]],
                  advance: Callable[[int], None] = lambda _n: None) -> npt.NDArray[np.float64]:
    """P(unsafe) of each conversation as the worker scores it: the best of its rows."""
    out = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        out[start : start + len(chunk)] = monitor.p_unsafe_of(chunk)
        advance(len(chunk))
    return out


def calibrate_long_cut(settings: Settings, monitor: Monitor, trained_on: Sequence[Record], *, epsilon: float,
                       delta: float, expert: Expert | None = None, found: LongConversations | None = None,
                       advance: Callable[[int], None] = lambda _n: None) -> LongConversationCut | None:
    """The probe's long-conversation cut at ε, δ, or with ``expert`` that expert's, on the same dialogues (``found``:
    those ``long_conversations`` selected for both, else selected here), the expert reading each as
    ``long_calibration.expert_read`` says; None when ``max_conversations`` is 0 or windows are off (then no
    conversation is a long dialogue: ``Monitor.is_long_dialogue``)."""
    config = settings.long_calibration
    if config.max_conversations == 0 or not monitor.windows.enabled:
        return None
    if found is None:
        found = long_conversations(settings, monitor, trained_on, limit=config.max_conversations)
    read = "whole" if expert is None else config.expert_read
    scores = (worker_scores(monitor, found.rows, advance) if expert is None
              else score_in_chunks(expert, found.records, advance, chunk=CHUNK, read=read))
    cut = calibrate_unsafe_cut(scores, np.zeros(scores.size, dtype=np.int64), epsilon=epsilon, delta=delta,
                               scorer="probe" if expert is None else expert.name)
    log.info("calibration.long_cut", scorer=cut.scorer, cut=cut.cut, valid=cut.valid, n=cut.n, fpr=cut.fpr,
             considered=found.considered, files=list(config.files), expert_read=read)
    return LongConversationCut(cut=cut, windows=monitor.windows.model_dump(mode="json"), max_tokens=monitor.max_tokens,
                               files=list(config.files), seed=config.seed, expert_read=read)
