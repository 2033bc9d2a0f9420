"""The per-event monitor: bundle heads on the monitored model's activations, and the delegation rule.

The decision for one event depends only on its own features, the model/bundle versions and the threshold,
never on what else is in its batch (docs/method.md §5), so batching is free to reorder events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from probes.activations.batching import split_padding
from probes.activations.features import FeatureExtractor, TokenBatch, collate
from probes.activations.models import LoadedModel, load_model
from probes.activations.windows import argmax_by_group, window_ids_batch
from probes.config import ModelConfig
from probes.conversation import Conversation, Message, is_long_dialogue, user_turns_of
from probes.errors import BundleError
from probes.heads.inference import MLPHead, sigmoid, uncertainty, with_extra_features
from probes.logs import get_logger
from probes.runtime.bundle import Bundle, load_bundle
from probes.runtime.manifest import BundleManifest, Signal

__all__ = ["DelegationRule", "Monitor", "Scores", "Signal", "head_scores", "uncertainty"]

log = get_logger(__name__)
F64 = npt.NDArray[np.float64]
# A batch's rows are split into separately padded forwards only when that saves at least this many padded
# tokens: each extra forward costs fixed work (kernel launches, 15 blocks' dispatch), about this many tokens' worth.
MIN_SPLIT_SAVING_TOKENS = 1024


@dataclass(frozen=True)
class DelegationRule:
    """delegate ⇔ signal > threshold. ``threshold=None`` means no certified threshold: never delegate."""

    signal: Signal
    threshold: float | None
    alpha: float | None
    variant: str = "fixed"

    def __post_init__(self) -> None:
        object.__setattr__(self, "signal", Signal(self.signal))  # a plain "dv" becomes the enum member

    @property
    def valid(self) -> bool:
        return self.threshold is not None

    @classmethod
    def from_manifest(cls, manifest: BundleManifest) -> DelegationRule:
        cal = manifest.calibration
        if cal is None or cal.signal is None:
            signal = Signal.DV if "dv" in manifest.head_names else Signal.UNCERTAINTY
            return cls(signal=signal, threshold=None, alpha=None, variant="uncalibrated")
        return cls(signal=cal.signal, threshold=cal.threshold, alpha=cal.alpha, variant=cal.variant)

    def decide(self, values: npt.ArrayLike, threshold: float | None = None) -> npt.NDArray[np.bool_]:
        tau = self.threshold if threshold is None else threshold
        v = np.asarray(values, dtype=np.float64)
        if tau is None:
            return np.zeros(v.shape, dtype=bool)
        return v > tau


@dataclass(frozen=True)
class Scores:
    p_unsafe: F64
    dv: F64 | None
    signal: F64
    #: The pooled activations each score was read from (one row per score), only when the caller asked for them
    #: (``keep_features``: the online head refit needs them; otherwise they are not kept past the heads).
    features: npt.NDArray[np.float32] | None = None
    #: P(unsafe) of every row a conversation was read in, in row order (``score_grouped``: each conversation scores
    #: as its highest row); the worker re-scores only the rows that can decide a near-cut event.
    row_p_unsafe: F64 | None = None


def uncertainty_centre(manifest: BundleManifest) -> float | None:
    """Where the bundle's uncertainty signal is centred: the cut its delegation threshold was calibrated with
    (None on calibrations before the cut was the centre: −|p − 0.5|); uncalibrated, the bundle's probe cut."""
    calibration = manifest.calibration
    if calibration is not None and calibration.signal == Signal.UNCERTAINTY:
        return calibration.uncertainty_centre
    return manifest.probe_cut


def head_scores(bundle: Bundle, features: npt.ArrayLike, signal: Signal, *, keep_features: bool = False,
                centre: float | None | Literal["bundle"] = "bundle") -> Scores:
    """Probe, DV and the delegation signal for pooled features. ``centre`` overrides the uncertainty signal's
    centre (calibration computes the signal it is about to calibrate around the bundle's current cut)."""
    p = bundle.heads["safety"].proba(features)
    dv = dv_scores(bundle, features, p) if "dv" in bundle.heads else None
    kept = np.asarray(features, dtype=np.float32) if keep_features else None
    if signal == Signal.DV:
        if dv is None:
            raise BundleError("the bundle's calibration uses the DV signal but the bundle has no DV head")
        return Scores(p, dv, dv, kept)
    if signal == Signal.ROUTER:
        return Scores(p, dv, MLPHead.from_tensors(bundle.extra_tensors, "router").proba(features), kept)
    return Scores(p, dv, uncertainty(p, uncertainty_centre(bundle.manifest) if centre == "bundle" else centre), kept)


def dv_scores(bundle: Bundle, features: npt.ArrayLike, p: F64) -> F64:
    """The DV head's output; its kind (logistic → probability, ridge → value) is in the manifest."""
    head = bundle.heads["dv"]
    x = dv_inputs(bundle, features, p)
    info = bundle.manifest.heads.get("dv")
    return head.logit(x) if info is not None and info.type == "ridge" else sigmoid(head.logit(x))


def dv_inputs(bundle: Bundle, features: npt.ArrayLike, p: F64) -> npt.NDArray[np.float32]:
    """DV features: the activations, plus the probe's logit and its distance from the cut the head was trained at
    (|p − 0.5| on heads trained before) when the head was trained so."""
    info = bundle.manifest.heads.get("dv")
    if info is not None and info.extra_features:
        return with_extra_features(features, p, info.decision_cuts.get("probe"))
    return np.asarray(features, dtype=np.float32)


class Monitor:
    """Loads a bundle and the model it was trained on; scores token batches."""

    def __init__(self, bundle_dir: Path, model: ModelConfig, *, cache_dir: Path) -> None:
        self.bundle = load_bundle(bundle_dir)
        features = self.bundle.features
        # The bundle decides which model runs: its heads are meaningless on any other.
        spec = self.bundle.model.spec
        self.loaded: LoadedModel = load_model(
            spec, cache_dir=cache_dir, device=model.device, dtype=model.dtype, max_layer=features.layer
        )
        self.bundle.check_model(spec, self.loaded.weights_sha256)
        self.pooling = features.pooling
        self.max_tokens = self.bundle.model.max_tokens
        self.extractor = FeatureExtractor(
            self.loaded, layer=features.layer, max_tokens=self.max_tokens,
            batch_tokens=model.batch_tokens, max_items=model.max_batch_items,
        )
        self.rule = DelegationRule.from_manifest(self.bundle.manifest)
        self.windows = model.windows
        cut = self.bundle.manifest.unsafe_cut
        if cut is None or not cut.valid:
            log.warning("monitor.uncalibrated_unsafe_cut", bundle=self.bundle.version, cut=self.unsafe_cut,
                        reason="no unsafe cut in the bundle" if cut is None else "no cut certified at this epsilon")
        long = self.bundle.manifest.long_unsafe_cut
        if long is not None and (long.windows != self.windows.model_dump(mode="json")
                                 or long.max_tokens != self.max_tokens):
            log.warning("monitor.long_cut_reading_differs", certified=long.windows, reading=self.windows.model_dump(
                mode="json"), reason="the long-conversation cut was certified on another reading of long conversations")

    @property
    def unsafe_cut(self) -> float:
        """p_unsafe at or above which the probe's verdict is "unsafe": the bundle's calibrated cut."""
        return self.bundle.manifest.probe_cut

    @property
    def long_cut(self) -> float | None:
        """P(unsafe) at or above which a long dialogue (``is_long_dialogue``) is "unsafe" where the worker applies
        it (``worker.long_dialogue_cut``); never below ``unsafe_cut``; None: no long cut certified."""
        return self.bundle.manifest.long_probe_cut if self.windows.enabled else None

    @property
    def model_version(self) -> str:
        return f"{self.loaded.model_id}@{self.loaded.weights_sha256[:12]}"

    def tokenize(self, conversation: Conversation) -> list[int]:
        return self.extractor.tokenize([conversation])[0]

    def is_long_dialogue(self, conversation: Sequence[Message]) -> bool:
        """``is_long_dialogue`` under this reading (never with windows off: then nothing is read in windows)."""
        return self.windows.enabled and is_long_dialogue(conversation, self.windows.dialogue_chars)

    def reads(self, conversation: Conversation) -> tuple[Conversation, ...]:
        """What of a conversation is read (``windows.dialogue_read``): itself; of a long dialogue, its user turns
        (``user_turns``), or itself and its user turns (``all_and_user_turns``: it scores as the more unsafe, so a
        fake assistant turn of filler cannot dilute a request away and a harmful reply is still read)."""
        read = self.windows.dialogue_read
        if read == "all" or not self.is_long_dialogue(conversation):
            return (conversation,)
        turns = user_turns_of(conversation)
        if not turns:
            return (conversation,)
        return (turns,) if read == "user_turns" else (conversation, turns)

    def tokenize_windows(self, conversation: Conversation) -> list[list[int]]:
        """The rows to score for one conversation: one when it fits ``max_tokens``, else windows too. The same rows
        as in a batch (``tokenize_windows_batch``): an event's rows never depend on what it was fetched with."""
        return self.tokenize_windows_batch([conversation])[0]

    def tokenize_windows_batch(self, conversations: Sequence[Conversation]) -> list[list[list[int]]]:
        """``tokenize_windows`` for many at once: the same rows from a few calls of the fast tokenizer for all
        (it releases the GIL), no chat template run per window; a conversation read more than one way has the rows
        of each. Raises if any conversation fails."""
        reads = [self.reads(c) for c in conversations]
        rows = iter(window_ids_batch(self.extractor.renderer, [r for rs in reads for r in rs], self.windows))
        return [[row for _ in rs for row in next(rows)] for rs in reads]

    def collate(self, ids: Sequence[Sequence[int]]) -> TokenBatch:
        return self._pinned(collate(ids, list(range(len(ids))), self.extractor.pad_id))

    def collate_by_length(self, ids: Sequence[Sequence[int]]) -> list[TokenBatch]:
        """``ids`` as batches of similar lengths (``indices``: the rows' positions in ``ids``), so short window
        rows are not padded to a long row of the same batch (probes/activations/batching.py ``split_padding``)."""
        groups = split_padding([len(x) for x in ids], min_saving=MIN_SPLIT_SAVING_TOKENS)
        return [self._pinned(collate([ids[i] for i in group], group, self.extractor.pad_id)) for group in groups]

    def _pinned(self, batch: TokenBatch) -> TokenBatch:
        if self.loaded.device.type == "cuda":
            # Page-locked host memory (in the prep thread) is what makes the non-blocking copy to the GPU
            # asynchronous; from pageable memory it silently synchronises.
            return TokenBatch(batch.indices, batch.input_ids.pin_memory(), batch.attention_mask.pin_memory())
        return batch

    def features(self, batch: TokenBatch) -> npt.NDArray[np.float32]:
        return self.extractor.pooled_batch(batch, self.pooling)

    def score(self, batch: TokenBatch, *, keep_features: bool = False) -> Scores:
        return head_scores(self.bundle, self.features(batch), self.rule.signal, keep_features=keep_features)

    def score_grouped(self, batches: Sequence[TokenBatch], groups: Sequence[int], n: int, *,
                      keep_features: bool = False) -> Scores:
        """Scores of ``n`` conversations whose rows are in ``batches`` (``groups[row]`` = its conversation, rows
        numbered by the batches' ``indices``): each takes the row with the highest P(unsafe) (probes/activations/windows.py),
        and with ``keep_features`` that row's pooled activations, the ones its P(unsafe) was read from."""
        if len(batches) == 1 and batches[0].indices == list(range(len(groups))):
            scores = self.score(batches[0], keep_features=keep_features)
        else:  # heads score each row alone: per batch, then back in row order
            parts = [(batch.indices, self.score(batch, keep_features=keep_features)) for batch in batches]
            p_unsafe, signal = np.empty(len(groups)), np.empty(len(groups))
            dv = None if parts[0][1].dv is None else np.empty(len(groups))
            first = parts[0][1].features
            features = None if first is None else np.empty((len(groups), first.shape[1]), dtype=np.float32)
            for indices, part in parts:
                p_unsafe[indices], signal[indices] = part.p_unsafe, part.signal
                if dv is not None and part.dv is not None:
                    dv[indices] = part.dv
                if features is not None and part.features is not None:
                    features[indices] = part.features
            scores = Scores(p_unsafe, dv, signal, features)
        rows = argmax_by_group(scores.p_unsafe.tolist(), groups, n)
        return Scores(scores.p_unsafe[rows], None if scores.dv is None else scores.dv[rows], scores.signal[rows],
                      None if scores.features is None else scores.features[rows], row_p_unsafe=scores.p_unsafe)

    def p_unsafe_of(self, rows: Sequence[Sequence[Sequence[int]]]) -> F64:
        """P(unsafe) of conversations from their rows (``tokenize_windows_batch``), as the worker scores each: its
        highest row."""
        flat = [row for views in rows for row in views]
        groups = [i for i, views in enumerate(rows) for _ in views]
        return self.score_grouped(self.collate_by_length(flat), groups, len(rows)).p_unsafe
