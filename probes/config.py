"""Configuration as frozen pydantic models, loaded from a YAML/TOML file and ``CTD_*`` environment variables.

Precedence (highest first): explicit keyword arguments, environment variables (``CTD_MODEL__DTYPE=fp32``),
the config file, the defaults below.
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from probes.errors import ConfigError

Dtype = Literal["auto", "bf16", "fp16", "fp32"]
#: How the guard's expert reads a long dialogue (probes/experts/dialogue_read.py).
ExpertRead = Literal["whole", "whole_and_user_turns"]
#: rollmaxK: max over positions of the mean of K consecutive tokens (probes.activations.features.pool_rolling_max).
Pooling = Literal["mean", "last", "max", "rollmax4", "rollmax8", "rollmax16", "rollmax32"]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WindowConfig(Frozen):
    """How conversations longer than ``model.max_tokens`` are scored (probes/activations/windows.py)."""

    enabled: bool = True
    window_tokens: int = Field(48, ge=8, description="content tokens per window")
    stride_tokens: int = Field(24, ge=1, description="start-to-start distance of windows")
    max_windows: int = Field(16, ge=2, description="windows per conversation (head and tail always included)")
    max_bytes: int = Field(
        65_536, ge=1024, description="content (UTF-8 bytes) of a conversation read whole; past this only its latest "
        "bytes (max_tokens x the most bytes a token covers, at most half of this) and a sample of bytes per window "
        "are normalised and tokenized")
    dialogue_chars: int = Field(
        1024, ge=1, description="content (characters) past which a conversation holding an assistant turn is a long "
        "dialogue: the traffic the long-conversation cut is certified on (docs/method.md §6c)")
    dialogue_read: Literal["all", "user_turns", "all_and_user_turns"] = Field(
        "all_and_user_turns", description="how a long dialogue is read: all its turns; its user turns only (a probe "
        "trained on requests then ranks long dialogues far better, and a harmful reply in one is left to the response "
        "monitor); or both (the default), scoring as the more unsafe: a fake assistant turn of filler cannot dilute a "
        "request away, and a harmful reply is still read (docs/method.md §6c)")

    @model_validator(mode="after")
    def _stride_within_window(self) -> WindowConfig:
        if self.stride_tokens > self.window_tokens:
            raise ValueError("stride_tokens > window_tokens would leave content between windows unread")
        return self


class ModelConfig(Frozen):
    """The monitored chat model whose hidden states the probes read."""

    spec: str = "smollm2-135m-instruct"
    device: str = "cpu"
    dtype: Dtype = Field("auto", description="auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32")
    max_tokens: int = Field(256, ge=8, le=131072)
    batch_tokens: int = Field(8192, ge=64, description="padded tokens (max_len x n) per forward batch")
    max_batch_items: int = Field(64, ge=1)
    windows: WindowConfig = WindowConfig()


class FeatureConfig(Frozen):
    layer: int = Field(15, ge=1, description="hidden_states index: output of block `layer` (1-based)")
    pooling: Pooling = "mean"


DEFAULT_FILES: tuple[str, ...] = (
    "advbench.jsonl",
    "harmbench.jsonl",
    "jailbreakbench_behaviors.jsonl",
    "strongreject.jsonl",
    "malicious_instruct.jsonl",
    "tdc2023.jsonl",
    "xstest.jsonl",
    "simple_safety_tests.jsonl",
    "do_not_answer.jsonl",
    "forbidden_questions.jsonl",
    "jailbreak_prompts_itw.jsonl",
    "harmfulqa.jsonl",
    "catqa.jsonl",
    "dangerousqa.jsonl",
    "cosafe_single_prompts.jsonl",
    "tense_reformulations.jsonl",
    "dices_990.conversations.jsonl",
    "alpaca_benign.jsonl",
)

#: Contrastive sources where both classes share one style (datasets README): harmful requests next to benign
#: look-alikes, hateful texts next to minimal non-hateful edits, abusive next to ordinary user turns to one bot,
#: unsafe next to safe replies. Read with ``class_balance_per_source`` so each weighs both classes alike.
CONTRASTIVE_FILES: tuple[str, ...] = (
    "coconot.jsonl",
    "convabuse.conversations.jsonl",
    "hatecheck.jsonl",
    "hatemoji.jsonl",
    "diasafety.conversations.jsonl",
    "tweeteval_hate.jsonl",
    "tweeteval_offensive.jsonl",
    "edos.jsonl",
)
#: The broad training set of issue 21: today's files and the contrastive sources.
BROAD_FILES: tuple[str, ...] = DEFAULT_FILES + CONTRASTIVE_FILES


def default_datasets_dir() -> Path:
    """``../shared/datasets`` beside the checkout (or the working directory), the layout this project ships in."""
    here = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), here):
        for candidate in (base / "shared" / "datasets", base.parent / "shared" / "datasets"):
            if candidate.is_dir():
                return candidate
    return here.parent / "shared" / "datasets"


class SplitConfig(Frozen):
    """Fractions of the disjoint, seeded splits; they must add up to 1."""

    seed: int = 0
    probe_train: float = 0.5
    dev: float = 0.2
    calibration: float = 0.15
    evaluation: float = 0.15

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.probe_train + self.dev + self.calibration + self.evaluation
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must add up to 1, got {total}")
        return self


class DataConfig(Frozen):
    """What a bundle trains and calibrates on. The default is the broad set: without the contrastive sources
    "harm" and "source style" were one feature, and the certified cut flagged most benign traffic of unseen sources
    (docs/generalization.md, "The broad set")."""

    datasets_dir: Path = Field(default_factory=default_datasets_dir)
    files: tuple[str, ...] = BROAD_FILES
    sources: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    max_per_source: int | None = Field(150, ge=1, description="seeded cap per source; None keeps all")
    class_balance_per_source: bool = Field(
        True, description="a source holding both classes contributes as many of each (its smaller class, or half "
        "the cap): its style then says nothing about the label")
    balance_with: str | None = Field(
        "alpaca", description="source tag of label-0 rows subsampled to match the positives of the rest"
    )
    splits: SplitConfig = SplitConfig()


class LongCalibrationConfig(Frozen):
    """Long benign dialogues the probe's cut for long dialogues is certified on (probes/evaluation/long_cut.py).

    A conversation longer than ``model.max_tokens`` is scored as the best of its views (probes/activations/windows.py),
    and the calibration split holds few or none of them: the cut certified there bounds nothing on long dialogues
    (docs/method.md §6c). Rows of these files sharing a user turn with the bundle's data are skipped.
    """

    files: tuple[str, ...] = Field(
        ("xstest_completions.conversations.jsonl", "refusal_direction_completions.conversations.jsonl"),
        description="conversation files read for their long benign (label 0) conversations")
    max_conversations: int = Field(
        200, ge=0, description="long benign conversations the long cut is certified on (0: no long cut); the rest "
        "of them stay unseen for measuring it")
    seed: int = 0
    expert_read: ExpertRead = Field(
        "whole_and_user_turns", description="how the expert's long cut reads a long dialogue, and so how the guard "
        "reads one under it (probes/experts/dialogue_read.py): whole, or also its user turns alone, keeping the more "
        "unsafe (a fake assistant turn of filler then cannot hide a request; docs/method.md §6c)")


class EncoderHeadConfig(Frozen):
    """The offline expert: all-mpnet-base-v2 fine-tuned as a sequence classifier."""

    backbone: str = "all-mpnet-base-v2"
    max_length: int = Field(320, ge=16, le=512)
    epochs: float = Field(2.0, gt=0)
    learning_rate: float = 3e-5
    batch_size: int = 16
    train_layers: int | Literal["all"] = Field(
        6, description="fine-tune all encoder layers or only the top N (plus pooler and head)"
    )
    max_train: int | None = Field(None, ge=8, description="cap on training texts (CI uses a small subset)")
    max_windows: int = Field(
        16, ge=2, description="a conversation longer than max_length is read in up to this many half-overlapping "
        "windows from head to tail and scored as the most unsafe (more needed: the stride grows, head and tail "
        "always read)")
    dtype: Dtype = "auto"
    device: str = "cpu"
    seed: int = 0


class HFGuardConfig(Frozen):
    """A local causal-LM guard scored from its first generated token (Llama Guard style)."""

    model: str = "smollm2-135m-instruct"
    prompt_template: str = (
        "Task: Check if there is unsafe content in the conversation below according to our safety policy.\n\n"
        "<BEGIN CONVERSATION>\n\n{conversation}\n\n<END CONVERSATION>\n\n"
        "Provide your safety assessment for the conversation. Answer with one word, 'safe' or 'unsafe'."
    )
    use_chat_template: bool = True
    unsafe_token: str = "unsafe"
    safe_token: str = "safe"
    answer_prefix: str = ""
    max_length: int = 1024
    dtype: Dtype = "auto"
    device: str = "cpu"
    batch_size: int = 8


class OpenAIExpertConfig(Frozen):
    """An OpenAI-compatible completions endpoint with logprobs (how vLLM serves Llama Guard)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "meta-llama/Llama-Guard-3-8B"
    api_key: SecretStr = SecretStr("")
    prompt_template: str = HFGuardConfig().prompt_template
    unsafe_token: str = "unsafe"
    safe_token: str = "safe"
    timeout_s: float = 30.0
    max_retries: int = 3
    backoff_s: float = 0.5
    concurrency: int = Field(8, ge=1)
    top_logprobs: int = Field(20, ge=1)
    api: Literal["completions", "chat"] = "completions"
    chat_messages: Literal["template", "conversation"] = Field(
        "template", description="chat API: our guard prompt as one user turn, or the raw conversation (LG3 on vLLM)"
    )
    prompts_per_request: int = Field(1, ge=1, description="completions API: prompts batched into one request")
    params_per_token: int = Field(0, ge=0, description="guard parameters, for compute accounting (8e9 for LG3-8B)")


ExpertBackendName = Literal["encoder-head", "hf-guard", "openai-compatible"]


class ExpertConfig(Frozen):
    backend: ExpertBackendName = "encoder-head"
    path: Path | None = Field(None, description="encoder-head: a trained expert directory (default: the bundle's)")
    encoder_head: EncoderHeadConfig = EncoderHeadConfig()
    hf_guard: HFGuardConfig = HFGuardConfig()
    openai: OpenAIExpertConfig = OpenAIExpertConfig()


class ProbeConfig(Frozen):
    regularization_c: float = Field(0.5, gt=0, description="inverse L2 strength of the logistic probe")
    max_iter: int = 2000


RESPONSE_FILES: tuple[str, ...] = (
    "xstest_completions.conversations.jsonl",
    "do_not_answer_responses.conversations.jsonl",
    "refusal_direction_completions.conversations.jsonl",
)

Aggregator = Literal["ema", "rolling_max"]


class StreamConfig(Frozen):
    """The token-level probe read while a response streams (docs/method.md §7): training, smoothing, stop rule."""

    files: tuple[str, ...] = Field(RESPONSE_FILES, description="response datasets (label: response_label)")
    max_per_source: int | None = Field(300, ge=1, description="seeded cap per response source; None keeps all")
    decay: float = Field(0.9, gt=0, lt=1, description="EMA decay λ: s_t = λ·s_{t−1} + (1−λ)·z_t")
    window: int = Field(16, ge=1, description="tokens per rolling mean (rolling-max aggregator)")
    aggregator: Aggregator = Field("ema", description="the smoothed score the stop rule reads")
    score: Literal["peak", "final"] = Field("peak", description="the stream's p_unsafe: peak or final smoothed score")
    warmup_tokens: int = Field(8, ge=1, description="training weight ramps linearly over the first N response tokens")
    train_tokens_per_response: int = Field(48, ge=1, description="tokens sampled per training response")
    max_response_tokens: int = Field(
        256, ge=8, description="the window W: response tokens trained on and calibrated, read from the response's "
        "start; the stream reads later tokens on a rolling context of the prefix and the W - stride tokens before "
        "them (responses.rolling_stride_tokens, responses.max_read_tokens)")
    regularization_c: float = Field(0.5, gt=0)
    alpha: float = Field(0.05, gt=0, lt=1, description="budget: certified stop rate on benign responses")
    delta: float = Field(0.1, gt=0, lt=1, description="allowed failure probability of the budget guarantee")
    holdback_tokens: int = Field(
        2, ge=0, description="trailing tokens of a non-final chunk left unscored: the next chunk may re-merge them"
    )
    calibration_max_tokens: int = Field(
        1024, ge=8, description="the stop threshold is calibrated on the smoothed peaks of benign calibration "
        "responses read as the stream reads them (rolling view past the window, stride W/4) up to this many tokens: "
        "later tokens score higher than first windows, and a longer read peaks more often")


class AuditConfig(Frozen):
    """The audit sample: a random share of events sent to the expert besides the delegated ones.

    Their expert verdicts are unbiased labels for the probe's current traffic: ``probes.calibration.recalibration`` refits
    the probe's Platt map and re-certifies its unsafe cut on a window of them (method: the LTT cut of
    ``probes.calibration.ltt.calibrate_unsafe_cut``, with the expert's verdict standing in for the label).
    """

    rate: float = Field(0.01, ge=0, le=1, description="share of events audited (hash of the event id, not random)")
    salt: str = Field("audit", description="hash salt: another salt audits another, equally random, sample")
    window: int = Field(1000, ge=10, description="most recent audited items the map and the cut are fitted on")
    min_window: int = Field(100, ge=10, description="audits held before the window replaces the bundle's cut")
    refit_every: int = Field(20, ge=1, description="refit after every k-th audit once min_window are held")
    epsilon: float = Field(0.05, gt=0, lt=1, description="certified benign (expert-benign) flag rate of the cut")
    delta: float = Field(0.1, gt=0, lt=1, description="allowed failure probability of that guarantee")
    platt_l2: float = Field(1.0, gt=0, description="L2 pull of the Platt map towards the identity (a=1, b=0)")
    refit: Literal["platt", "head"] = Field(
        "platt", description="platt: refit a Platt map of the probe's score and the cut (moves the operating point); "
        "head: refit the probe's linear head on the audited items' pooled activations and the cut (lets a guard "
        "that is right on new traffic teach the probe to rank it)")
    head_l2: float = Field(1.0, gt=0, description="L2 pull of a refit head towards the bundle's (standardised units)")

    @model_validator(mode="after")
    def _window_holds_min(self) -> AuditConfig:
        if self.min_window > self.window:
            raise ValueError("audit.min_window cannot exceed audit.window")
        return self


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "ctd-monitor"


_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("ctd_config_file", default=None)


class Settings(BaseSettings):
    """Everything the offline tooling needs. The worker extends this with its own sections."""

    model_config = SettingsConfigDict(
        env_prefix="CTD_", env_nested_delimiter="__", frozen=True, extra="forbid", nested_model_default_partial_update=True
    )
    file_sections: ClassVar[tuple[str, ...]] = ()

    cache_dir: Path = Field(default_factory=default_cache_dir)
    log_level: str = "INFO"
    model: ModelConfig = ModelConfig()
    features: FeatureConfig = FeatureConfig()
    data: DataConfig = DataConfig()
    probe: ProbeConfig = ProbeConfig()
    expert: ExpertConfig = ExpertConfig()
    stream: StreamConfig = StreamConfig()
    audit: AuditConfig = AuditConfig()
    long_calibration: LongCalibrationConfig = LongCalibrationConfig()

    @field_validator("cache_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file.get()
        if path is not None:
            if path.suffix in (".yaml", ".yml"):
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
            else:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


S = TypeVar("S", bound=Settings)


def load_settings(path: Path | str | None = None, *, cls: type[S] = Settings, **overrides: Any) -> S:  # type: ignore[assignment]
    """Load settings from an optional YAML/TOML file plus the environment; raise ConfigError on bad input."""
    file_path: Path | None = None
    if path is not None:
        file_path = Path(path)
        if not file_path.is_file():
            raise ConfigError(f"config file not found: {file_path}")
        if file_path.suffix not in (".yaml", ".yml", ".toml"):
            raise ConfigError(f"config file must be .yaml, .yml or .toml: {file_path}")
    token = _config_file.set(file_path)
    try:
        return cls(**overrides)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise ConfigError(f"invalid configuration: {exc}") from exc
    finally:
        _config_file.reset(token)
