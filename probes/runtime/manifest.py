"""The bundle manifest as typed, versioned models: read once when a bundle loads, never as a dict.

Format 2 (written) adds the calibrated unsafe cuts; format 1 manifests (written before) still load: the
migration only drops the keys format 2 computes itself (``calibration.valid``, ``calibration.extra``).
Everything a runtime or offline step reads is a typed field here; ``metrics`` alone stays free-form because it
only records measurements for people.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field, model_validator

from probes.config import Aggregator, ExpertRead, Pooling
from probes.errors import BundleError

FORMAT_VERSION: Final = 2
READABLE_VERSIONS = (1, 2)
DEFAULT_UNSAFE_CUT = 0.5  # what every cut was before calibration existed, and what an uncertified cut keeps


class Signal(enum.StrEnum):
    """The delegation signals the monitor can compute for one event (the only place they are spelled)."""

    DV = "dv"
    UNCERTAINTY = "uncertainty"
    ROUTER = "router"


SIGNAL_NAMES: tuple[str, ...] = tuple(s.value for s in Signal)  # as plain strings: JSON keys, CLI choices


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelInfo(_Frozen):
    spec: str
    weights_sha256: str
    max_tokens: int
    model_id: str | None = None
    dtype: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None


class FeatureInfo(_Frozen):
    layer: int
    pooling: Pooling


class DataRecipe(_Frozen):
    """How the splits were drawn: calibration and evaluation re-derive the same splits from it."""

    datasets_dir: str = ""
    file_sha256: dict[str, str] = Field(default_factory=dict)
    content_hash: str = ""
    max_per_source: int | None = None
    # False in manifests written before it was recorded: the default then, so they still re-derive their splits.
    class_balance_per_source: bool = False
    balance_with: str | None = None
    sources: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    split_seed: int = 0
    split_fractions: dict[str, float] = Field(default_factory=dict)
    split_sizes: dict[str, dict[str, int]] = Field(default_factory=dict)


class HeadInfo(_Frozen):
    """How one head was trained and is applied (``type`` and ``extra_features`` change how it scores)."""

    type: Literal["logistic", "ridge", "mlp"]
    output: str | None = None
    target: str | None = None
    extra_features: tuple[str, ...] = ()
    feature_set: str | None = None
    c: float | None = None
    regularization: float | None = None
    cv_auroc: dict[str, float] = Field(default_factory=dict)
    n_train: int | None = None
    train_positives: int | None = None
    trained_on: str | None = None
    expert_accuracy: dict[str, float] = Field(default_factory=dict)
    hidden: tuple[int, ...] = ()
    #: DV and router heads: the probe's and the expert's unsafe cuts their target ("the expert fixes the probe's
    #: decision") was taken at, and the probe cut the DV's margin input is measured from. Empty: 0.5 for both
    #: (heads trained before the cuts were used).
    decision_cuts: dict[str, float] = Field(default_factory=dict)


class ExpertInfo(_Frozen):
    backend: str
    path: str
    name: str
    evaluation: dict[str, float] = Field(default_factory=dict)


class Calibration(_Frozen):
    """The LTT delegation threshold; ``threshold=None`` means no valid threshold (never delegate).

    ``signal`` is None only for baselines the monitor cannot compute (evaluation's random policy).
    """

    signal: Signal | None
    variant: str
    alpha: float
    delta: float
    threshold: float | None
    n_cal: int = 0
    n_opt: int = 0
    n_ht: int = 0
    seed: int = 0
    certified: int = 0
    tested: int = 0
    ht_rate: float | None = None
    opt_error: float | None = None
    grid_size: int = 0
    #: The uncertainty signal's centre when ``threshold`` was calibrated on it: the probe cut, in log-odds.
    #: None: −|p − 0.5| (calibrations before the cut was the centre).
    uncertainty_centre: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in ("valid", "extra")}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def valid(self) -> bool:
        return self.threshold is not None


class UnsafeCut(_Frozen):
    """The score at or above which a scorer's verdict is "unsafe", certified on calibration data.

    Certified: with probability ≥ 1 − δ over the calibration draw, the benign flag rate P(score ≥ cut | benign)
    ≤ ε for traffic exchangeable with the calibration data. ``valid=False``: no cut certified on these data,
    ``cut`` keeps ``DEFAULT_UNSAFE_CUT`` and nothing bounds its flag rate.
    """

    scorer: str  # "probe", or the expert's name: an expert cut applies to that expert only
    cut: float
    valid: bool
    epsilon: float
    delta: float
    n: int  # benign (label 0) calibration items the test ran on
    fpr: float | None  # realised benign flag rate at ``cut`` on those items
    certified: int = 0
    tested: int = 0


class LongConversationCut(_Frozen):
    """A scorer's unsafe cut for long dialogues (``probes.conversation.is_long_dialogue``: an assistant turn and
    more than ``windows.dialogue_chars`` of content), certified on long benign dialogues scored the way the service
    scores them: the probe's (``cut.scorer == "probe"``) as the worker does (the best of their views, under
    ``windows.dialogue_read``), the expert's (``cut.scorer`` its name) as the guard does (``Expert.score``).

    Where a service applies it (``worker.long_dialogue_cut``, ``guard.long_dialogue_cut``), a long dialogue is flagged
    only at or above both this cut and the one in force for the rest, so each guarantee holds for its own traffic:
    short traffic like the calibration split, long dialogues like ``files``' benign ones. ``windows`` is the reading
    the cut was certified under (``dialogue_chars`` is the rule); another one in the worker is logged as a warning.
    ``expert_read`` is how an expert's cut read each dialogue (probes/experts/dialogue_read.py); the guard reads so.
    """

    cut: UnsafeCut
    windows: dict[str, Any]
    max_tokens: int
    files: list[str]
    seed: int = 0  # the order the files' dialogues were taken in: the first ``cut.n`` certified
    expert_read: ExpertRead = "whole"  # cuts from before the user-turns reading read whole


class StopCalibration(_Frozen):
    """One LTT stop threshold of a streamed response (probes/fitting/token_train.py); ``threshold=None``: never stop."""

    signal: str
    variant: str
    alpha: float
    delta: float
    threshold: float | None
    n_cal: int
    n_opt: int
    n_ht: int
    seed: int
    certified: int
    tested: int
    ht_rate: float | None
    grid_size: int

    @property
    def valid(self) -> bool:
        return self.threshold is not None


class StreamManifest(_Frozen):
    """How the token head (``heads["token"]``) was trained and how a stream applies it (probes/heads/token_probe.py).

    ``thresholds`` holds one stop calibration per aggregator (``ema``, ``rolling_max``) and one per
    conversation-level baseline (``stream_conv``, ``safety``: a full-text score, for evaluation only).
    """

    layer: int
    decay: float
    window: int
    aggregator: Aggregator
    score: Literal["peak", "final"]
    max_response_tokens: int
    prefix_max_tokens: int
    holdback_tokens: int
    warmup_tokens: int
    train_tokens_per_response: int
    max_per_source: int | None
    file_sha256: dict[str, str]
    content_hash: str
    split_seed: int
    split_sizes: dict[str, dict[str, int]]
    alpha: float
    delta: float
    n_benign_calibration: int
    thresholds: dict[str, StopCalibration]
    train_token_metrics: dict[str, float] = Field(default_factory=dict)
    #: Token thresholds calibrated on whole responses read up to this many tokens with this rolling stride
    #: (None: an older bundle, calibrated on the first ``max_response_tokens`` only).
    calibration_max_tokens: int | None = None
    calibration_stride: int | None = None


class BundleManifest(_Frozen):
    format_version: Literal[2] = FORMAT_VERSION
    created_at: str = Field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())
    bundle_id: str | None = None
    model: ModelInfo
    features: FeatureInfo
    data: DataRecipe
    files: dict[str, str] = Field(default_factory=dict)
    head_names: tuple[str, ...] = ()
    heads: dict[str, HeadInfo] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    calibration: Calibration | None = None
    unsafe_cut: UnsafeCut | None = None
    expert: ExpertInfo | None = None
    expert_unsafe_cut: UnsafeCut | None = None
    long_unsafe_cut: LongConversationCut | None = None
    expert_long_unsafe_cut: LongConversationCut | None = None
    stream: StreamManifest | None = None

    @property
    def version(self) -> str:
        return self.bundle_id or "unknown"

    @property
    def probe_cut(self) -> float:
        """The probe's unsafe cut: the calibrated one, else the default."""
        return self.unsafe_cut.cut if self.unsafe_cut is not None else DEFAULT_UNSAFE_CUT

    @property
    def long_probe_cut(self) -> float | None:
        """The probe's cut for long conversations: never below ``probe_cut``; None when no long cut was certified
        (long conversations then share ``probe_cut``, whose flag rate on them nothing bounds)."""
        long = self.long_unsafe_cut
        return max(long.cut.cut, self.probe_cut) if long is not None and long.cut.valid else None

    def expert_cut(self, expert_name: str) -> UnsafeCut | None:
        """The calibrated cut of this expert; None when the bundle's expert cut belongs to another scorer."""
        cut = self.expert_unsafe_cut
        return cut if cut is not None and cut.scorer == expert_name else None

    def expert_long_cut(self, expert_name: str) -> LongConversationCut | None:
        """This expert's certified cut for long dialogues; None when there is none, it did not certify, or it
        belongs to another scorer."""
        long = self.expert_long_unsafe_cut
        return long if long is not None and long.cut.valid and long.cut.scorer == expert_name else None

    def replace(self, **changes: Any) -> BundleManifest:
        """A validated copy with some sections replaced (sections may be models or plain JSON values)."""
        try:
            return BundleManifest.model_validate({**dict(self), **changes})
        except ValidationError as exc:
            raise BundleError(f"invalid manifest change: {exc}") from exc

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, raw: bytes, *, where: str = "manifest") -> BundleManifest:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BundleError(f"unreadable manifest {where}: {exc}") from exc
        version = data.get("format_version") if isinstance(data, dict) else None
        if version not in READABLE_VERSIONS:
            raise BundleError(f"unsupported bundle format in {where}: {version!r}")
        if version == 1:
            data = {**data, "format_version": FORMAT_VERSION}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise BundleError(f"invalid manifest {where}: {exc}") from exc
