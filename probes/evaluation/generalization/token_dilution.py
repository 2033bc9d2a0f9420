"""The dilution yardstick (``probes.evaluation.dilution``) on the token-level scorer, read in one long pass.

The scorer is trained as under leave-source-out, on the broad pool with every harmful-request source the yardstick
draws from held out (the ``harmful_behaviors`` group and any other request file), cut on its calibration rows;
each padded conversation is then read whole (up to ``max_tokens``) in one forward pass and scored by the max of
rolling means of its token logits. The mean-pooled probe of the same fold, on the mean of the same token states,
is scored beside it: the same read, only the aggregation differs. With ``padding`` (``token_padding``), a third
scorer: the same fit rows plus padded and long benign rows from a non-yardstick filler, cut on calibration rows
that include long benign texts, scored on the same reads.

With ``read`` (``WindowRead``, ``--token-read windows:W:S``) every scorer reads a conversation longer than one window
as overlapping windows of its content instead (``windows.content_windows``, the worker's windows), each rendered
through the chat template as a conversation of its own, so it looks like the short records the scorers were trained
and cut on; its score is the maximum over them. A request of at most ``S`` tokens lies whole in some window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from probes.activations.features import FeatureExtractor
from probes.activations.render import full_ids, untrusted_content
from probes.activations.special_tokens import special_strings
from probes.activations.windows import content_windows
from probes.config import WindowConfig
from probes.conversation import Conversation, single_turn
from probes.evaluation.dilution import (
    FILLER_FILE,
    PLACEMENTS,
    REQUEST_FILES,
    FillerSource,
    dilution_report,
    held_out_requests,
    transformations,
)
from probes.evaluation.generalization.folds import Fold, LosoConfig, Recipe, make_fold
from probes.evaluation.generalization.pool import build_pool
from probes.evaluation.generalization.scoring import certified_cut, fit_head
from probes.evaluation.generalization.token_padding import PaddedFit, TokenPadding, fit_padded
from probes.evaluation.generalization.token_scorer import fill_token_states
from probes.fitting.token_scorer import TokenScorerFit, fit_token_scorer
from probes.heads.inference import LinearHead
from probes.heads.token_scorer import TokenScorer

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
#: The group holding the request files: held out of the scorer's training.
REQUEST_GROUP = "harmful_behaviors"


class StateReader:
    """Token states of conversations read whole, remembered per conversation (both scorers share one pass)."""

    def __init__(self, extractor: FeatureExtractor):
        self.extractor = extractor
        self._seen: dict[tuple[tuple[str, str], ...], F32] = {}

    def __call__(self, conversations: Sequence[Conversation]) -> list[F32]:
        keys = [tuple((m.role, m.content) for m in c) for c in conversations]
        todo = [i for i, k in enumerate(keys) if k not in self._seen]
        for i, states in zip(todo, self.extractor.token_states([conversations[i] for i in todo]), strict=True):
            self._seen[keys[i]] = states
        return [self._seen[k] for k in keys]


@dataclass(frozen=True)
class WindowRead:
    """Read a conversation as overlapping windows of ``window`` content tokens, ``stride`` apart."""

    window: int
    stride: int

    def __post_init__(self) -> None:
        if not 1 <= self.stride <= self.window:
            raise ValueError(f"need 1 <= stride <= window, got window {self.window} and stride {self.stride}")

    def config(self, read_tokens: int) -> WindowConfig:
        """The worker's window settings, with enough windows that the stride never grows up to ``read_tokens``."""
        needed = math.ceil(max(0, read_tokens - self.window) / self.stride) + 1
        return WindowConfig(window_tokens=self.window, stride_tokens=self.stride, max_windows=max(2, needed))


def parse_token_read(text: str) -> WindowRead | None:
    """``whole`` (one pass: None) or ``windows:W:S``."""
    parts = [p.strip() for p in text.split(":")]
    if parts == ["whole"]:
        return None
    if len(parts) == 3 and parts[0] == "windows":
        return WindowRead(int(parts[1]), int(parts[2]))
    raise ValueError(f"--token-read must be 'whole' or 'windows:W:S', got {text!r}")


class WindowReader:
    """Token states of each window of each conversation (``content_windows``), through a shared ``StateReader``.

    A conversation whose content fits in one window is read as it is (exactly the whole read); a longer one as its
    windows, each rendered from the chat template's start. ``tokens`` counts the tokens read, per conversation.
    """

    def __init__(self, read: StateReader, tokenizer: Any, config: WindowConfig):
        self.read, self.tokenizer, self.config = read, tokenizer, config
        self.tokens: dict[tuple[tuple[str, str], ...], int] = {}
        self.cuts: dict[tuple[tuple[str, str], ...], list[Conversation]] = {}
        #: P(unsafe) of each window, per scorer name, per conversation (where a max comes from).
        self.scores: dict[str, dict[tuple[tuple[str, str], ...], F64]] = {}

    def windows(self, conversation: Conversation) -> list[Conversation]:
        cut = content_windows(self.tokenizer, conversation, self.config)
        return [conversation] if len(cut) <= 1 else cut

    def __call__(self, conversations: Sequence[Conversation]) -> list[list[F32]]:
        per = [self.windows(c) for c in conversations]
        flat = self.read([w for ws in per for w in ws])
        out: list[list[F32]] = []
        for c, ws in zip(conversations, per, strict=True):
            states, flat = flat[: len(ws)], flat[len(ws):]
            self.tokens[_key(c)] = sum(s.shape[0] for s in states)
            self.cuts[_key(c)] = ws
            out.append(states)
        return out


def token_scorer_of(read: StateReader, scorer: TokenScorer) -> Callable[[Sequence[Conversation]], F64]:
    """P(unsafe) of the token scorer: σ of the max of rolling means of the token logits."""
    return lambda conversations: scorer.proba(read(conversations))


def mean_probe_of(read: StateReader, head: LinearHead) -> Callable[[Sequence[Conversation]], F64]:
    """P(unsafe) of the mean-pooled probe on the mean of the same token states."""
    return lambda conversations: head.proba(np.stack([s.mean(axis=0) for s in read(conversations)]))


def _contains(ids: Sequence[int], part: Sequence[int]) -> bool:
    """``part`` appears in ``ids`` as a contiguous run."""
    n = len(part)
    return any(list(ids[i:i + n]) == list(part) for i in range(len(ids) - n + 1))


def _key(conversation: Conversation) -> tuple[tuple[str, str], ...]:
    return tuple((m.role, m.content) for m in conversation)


def _max_over_windows(read: WindowReader, name: str, per_window: Callable[[list[F32]], F64]
                      ) -> Callable[[Sequence[Conversation]], F64]:
    def score(conversations: Sequence[Conversation]) -> F64:
        out: list[float] = []
        for c, ws in zip(conversations, read(conversations), strict=True):
            p = per_window(ws)
            read.scores.setdefault(name, {})[_key(c)] = p
            out.append(float(p.max()))
        return np.asarray(out, dtype=np.float64)

    return score


def windowed_token_scorer(read: WindowReader, scorer: TokenScorer,
                          name: str = "token") -> Callable[[Sequence[Conversation]], F64]:
    """The token scorer's P(unsafe) of each window (its template prefix skipped), the max over windows."""
    return _max_over_windows(read, name, scorer.proba)


def windowed_mean_probe(read: WindowReader, head: LinearHead,
                        name: str = "mean_probe") -> Callable[[Sequence[Conversation]], F64]:
    """The mean-pooled probe on the mean of each window's states, the max over windows (as the worker's rows)."""
    return _max_over_windows(read, name, lambda ws: head.proba(np.stack([s.mean(axis=0) for s in ws])))


def training_fold(pool_files: Sequence[str], fold: Fold) -> Fold:
    """``fold`` without any row of a request file (the yardstick's requests must be unseen)."""
    keep_fit = np.asarray([pool_files[i] not in REQUEST_FILES for i in fold.fit], dtype=bool)
    keep_cal = np.asarray([pool_files[i] not in REQUEST_FILES for i in fold.calibration], dtype=bool)
    return Fold(fold.group, fold.fit[keep_fit], fold.calibration[keep_cal], fold.test, fold.weights[keep_fit])


def run_token_dilution(config: LosoConfig, recipe: Recipe, fit: TokenScorerFit, *, cache_dir: Path,
                       datasets_dir: Path, n: int = 20, lengths: Sequence[int] = (256, 1024, 3072),
                       max_tokens: int = 4096, layer: int = 15, tolerance: float = 0.1, seed: int = 0,
                       padding: TokenPadding | None = None, read_windows: WindowRead | None = None,
                       progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The yardstick on the token scorer and, on the same reads, on the mean-pooled probe of the same fold (and
    on the padded token scorer when ``padding`` is given); every scorer reads in windows when ``read_windows`` is
    given, else each text whole."""
    from probes.activations.models import load_model
    from probes.data import read_file

    pool = build_pool(datasets_dir, config.pool)
    read_pool = fill_token_states(cache_dir, pool, layer=layer, spec=config.probe_spec,
                                  max_tokens=config.probe_max_tokens, dtype=config.dtype)
    states = read_pool.states
    y = np.asarray([p.record.label for p in pool], dtype=np.int64)
    files = [p.record.file for p in pool]
    fold = training_fold(files, make_fold(pool, REQUEST_GROUP, recipe, calibration_fraction=config.calibration_fraction,
                                          seed=config.seed))
    _, scorer = fit_token_scorer([states[i] for i in fold.fit], y[fold.fit], fold.weights, fit,
                                 skip=read_pool.prefix)
    means = np.stack([s.astype(np.float32).mean(axis=0) for s in states])
    probe = fit_head(means[fold.fit], y[fold.fit], fold.weights, recipe.c, config.seed)
    benign = fold.calibration[y[fold.calibration] == 0]
    token_cut = certified_cut(scorer.proba([states[i] for i in benign]), epsilon=recipe.epsilon,
                              delta=config.delta) if recipe.cut == "fpr" else 0.5
    probe_cut = certified_cut(probe.proba(means[benign]), epsilon=recipe.epsilon,
                              delta=config.delta) if recipe.cut == "fpr" else 0.5
    trained = sorted({files[i] for i in (*fold.fit, *fold.calibration)})
    requests, request_files = held_out_requests(datasets_dir, trained, n, seed=seed)
    loaded = load_model(config.probe_spec, cache_dir=cache_dir, dtype=config.dtype, max_layer=layer)
    extractor = FeatureExtractor(loaded, layer=layer, max_tokens=max_tokens, batch_tokens=max_tokens,
                                 max_items=8)
    read = StateReader(extractor)
    padded: PaddedFit | None = None
    if padding is not None:
        padded = fit_padded(pool, fold, states, y, fit, padding, extractor, recipe=recipe, config=config,
                            cache_dir=cache_dir, datasets_dir=datasets_dir, skip=read_pool.prefix)
    filler = FillerSource(loaded.tokenizer, [r.messages[0].content for r in
                                             read_file(datasets_dir / FILLER_FILE)[:2000]])
    out: dict[str, Any] = {"fit": {"objective": fit.objective, "window": fit.window}, "max_tokens": max_tokens,
                           "request_files": request_files, "trained_files": trained,
                           "cuts": {"token": token_cut, "mean_probe": probe_cut,
                                    **({} if padded is None else {"token_padded": padded.cut})},
                           "template_prefix_tokens": read_pool.prefix}
    windows = None if read_windows is None else WindowReader(read, loaded.tokenizer,
                                                             read_windows.config(max_tokens))

    def scorers(token: TokenScorer, name: str = "token") -> tuple[Callable[[Sequence[Conversation]], F64],
                                                                  Callable[[Sequence[Conversation]], F64]]:
        if windows is None:
            return token_scorer_of(read, token), mean_probe_of(read, probe)
        return windowed_token_scorer(windows, token, name), windowed_mean_probe(windows, probe)

    token_score, probe_score = scorers(scorer)
    out["read"] = "whole" if read_windows is None else {"window": read_windows.window,
                                                        "stride": read_windows.stride}
    out["token"] = dilution_report(requests, token_score, token_cut or 0.5, filler,
                                   lengths=lengths, tolerance=tolerance, seed=seed, progress=progress)
    out["mean_probe"] = dilution_report(requests, probe_score, probe_cut or 0.5, filler,
                                        lengths=lengths, tolerance=tolerance, seed=seed)
    if padded is not None:
        out["padding"] = padded.summary
        out["token_padded"] = dilution_report(requests, scorers(padded.scorer, "token_padded")[0],
                                              padded.cut or 0.5, filler, lengths=lengths, tolerance=tolerance,
                                              seed=seed)
    if windows is not None:
        out["tokens_read"] = read_cost(requests, filler, lengths, seed, windows, loaded.tokenizer)
        out["where_max"] = {name: where_max(requests, filler, lengths, seed, windows, name, tolerance)
                            for name in windows.scores}
    return out


def where_max(requests: Sequence[str], filler: FillerSource, lengths: Sequence[int], seed: int,
              windows: WindowReader, name: str, tolerance: float) -> dict[str, dict[str, float]]:
    """Per padded transformation: is the max a window holding the request whole, and does that window keep the
    request's score alone (within ``tolerance``)? ``own``: mean of the best holding window's P; ``filler``: mean of
    the best other window's P (0 where every window holds the request). A window holds the request when its
    content's tokens contain the request's as one run (a request longer than the stride may lie in none)."""
    scores, tok = windows.scores[name], windows.tokenizer
    specials = special_strings(tok)

    def ids(text: str) -> list[int]:
        return list(tok(untrusted_content(text, specials), add_special_tokens=False)["input_ids"])

    def holds(window: Conversation, request: list[int]) -> bool:
        return any(_contains(ids(m.content), request) for m in window)

    rows: dict[str, list[tuple[bool, float, float, float]]] = {}
    for i, request in enumerate(requests):
        variants = transformations(request, filler, lengths, WindowConfig(), seed + i)
        alone = float(scores[_key(single_turn(request))].max())
        own_ids = ids(request.strip())
        for label, text in variants.items():
            if label.split("_")[0] not in PLACEMENTS:
                continue
            key = _key(single_turn(text))
            p = scores[key]
            held = np.asarray([holds(w, own_ids) for w in windows.cuts[key]])
            own = float(p[held].max()) if held.any() else float("nan")
            rest = float(p[~held].max()) if (~held).any() else 0.0
            rows.setdefault(label, []).append((bool(held[int(np.argmax(p))]), own, rest,
                                               abs(own - alone) if held.any() else float("inf")))
    return {label: {"max_is_request_window": float(np.mean([r[0] for r in rs])),
                    "request_in_a_window": float(np.mean([not np.isnan(r[1]) for r in rs])),
                    "own": float(np.mean([r[1] for r in rs if not np.isnan(r[1])] or [np.nan])), "filler": float(np.mean([r[2] for r in rs])),
                    "own_moved": float(np.mean([r[3] > tolerance for r in rs]))}
            for label, rs in rows.items()}


def read_cost(requests: Sequence[str], filler: FillerSource, lengths: Sequence[int], seed: int,
              windows: WindowReader, tokenizer: Any) -> dict[str, dict[str, int]]:
    """Tokens read per transformation, summed over the requests: in windows, and whole in one pass."""
    out: dict[str, dict[str, int]] = {}
    for i, request in enumerate(requests):
        for name, text in transformations(request, filler, lengths, WindowConfig(), seed + i).items():
            conversation = single_turn(text)
            row = out.setdefault(name, {"windows": 0, "whole": 0})
            row["windows"] += windows.tokens[_key(conversation)]
            row["whole"] += len(full_ids(tokenizer, conversation))
    return out

