"""Streaming settings: Kafka connection, topics, batching, budget and runtime limits (frozen pydantic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr

from probes.config import AuditConfig, Frozen, Settings

# Room above worker.max_event_bytes in the topics' max.message.bytes: key, headers and batch framing (topics.py).
RECORD_OVERHEAD_BYTES = 65_536


class KafkaConfig(Frozen):
    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "ctd-monitor"
    group_id: str = "ctd-monitor"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    session_timeout_ms: int = 30_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    request_timeout_ms: int = 30_000

    def client_kwargs(self) -> dict[str, Any]:
        """Connection arguments shared by aiokafka consumers, producers and admin clients."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            )
        if self.security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        return kwargs

    def producer_kwargs(self, max_event_bytes: int | None = None) -> dict[str, Any]:
        """Producer settings of every output: acknowledged by all replicas, idempotent, briefly lingering."""
        # aiokafka keeps one batch per partition in flight and makes send() wait while it is full: at its
        # default 16 KiB (~25 verdicts) every send waited for several drains; 512 KiB takes a whole micro-batch.
        kwargs: dict[str, Any] = {"acks": "all", "enable_idempotence": True, "linger_ms": 5,
                                  "max_batch_size": 512 * 1024}
        if max_event_bytes is not None:
            # An output may embed its input (review requests), and a dead letter may fill the topic's limit.
            kwargs["max_request_size"] = max(4 * max_event_bytes, max_event_bytes + RECORD_OVERHEAD_BYTES)
        return kwargs


class TopicsConfig(Frozen):
    input: str = "conversations"
    verdicts: str = "verdicts"
    review: str = "expert-review"
    dead_letter: str = "ctd-dead-letter"
    alerts: str = "ctd-alerts"
    responses: str = Field("responses", description="streamed response chunks in (key: response_id)")
    response_verdicts: str = Field("response-verdicts", description="one terminal verdict per streamed response")

    def suffixed(self, suffix: str) -> TopicsConfig:
        """The same topic set under unique names (benchmarks and tests share one broker)."""
        return TopicsConfig(**{name: f"{topic}-{suffix}" for name, topic in self.model_dump().items()})

    def partitions(self, input_partitions: int, output_partitions: int = 3) -> dict[str, int]:
        """Topic → partition count for creating the whole set; workers scale up to ``input_partitions``."""
        return {self.input: input_partitions, self.verdicts: output_partitions, self.review: output_partitions,
                self.dead_letter: 1, self.alerts: 1, self.responses: input_partitions,
                self.response_verdicts: output_partitions}


class BatchingConfig(Frozen):
    max_batch_tokens: int = Field(8192, ge=64)
    max_items: int = Field(64, ge=1)
    max_wait_ms: float = Field(20.0, ge=0)
    lookahead: int = Field(512, ge=1)


class ServiceConfig(Frozen):
    """What every stream service sets the same way (``worker.*`` and ``guard.*`` keep these keys)."""

    max_in_flight: int = Field(2048, ge=1, description="events fetched but not committed before fetching pauses")
    shutdown_deadline_s: float = Field(25.0, gt=0, description="drain + flush + commit + leave, all of it")
    commit_interval_s: float = Field(1.0, gt=0)
    http_host: str = "0.0.0.0"
    http_port: int = Field(8080, ge=0, le=65535)
    liveness_max_stall_s: float = Field(120.0, gt=0)


class WorkerConfig(ServiceConfig):
    bundle: Path = Path("runs/bundle")
    max_event_bytes: int = Field(
        1_000_000, ge=1024,
        description="larger inputs are dead-lettered; topics are created with room for this (worker/topics.py)")
    max_metadata_depth: int = Field(16, ge=1, le=64, description="deeper event metadata is dead-lettered")
    max_metadata_bytes: int = Field(16_384, ge=2, description="larger event metadata (as JSON) is dead-lettered")
    inference_retries: int = Field(1, ge=0)
    decision_margin: float = Field(
        0.02, ge=0, lt=0.5, description="an event scored within this distance of the unsafe cut is scored again "
        "alone, so its decision does not depend on its batch (a redelivered duplicate decides the same); 0: off")


class BudgetConfig(Frozen):
    """Live delegation-budget control: windowed re-certification, sequential monitor, hard cap (worker/budget.py)."""

    window: int = Field(2000, ge=50, description="DV scores kept for the label-free window threshold")
    min_window: int = Field(500, ge=10, description="events seen before the window threshold applies")
    recertify_every: int = Field(200, ge=1, description="events between window re-certifications")
    delta: float = Field(0.05, gt=0, lt=1, description="error level of the window's fixed-sequence test")
    hard_cap: bool = Field(False, description="token bucket at alpha: never delegate faster than the budget")
    cap_burst: int = Field(20, ge=1, description="token-bucket depth (delegations allowed in a burst)")
    scope: Literal["worker", "partition", "tenant"] = Field(
        "worker", description="one budget window per worker, per partition, or per tenant (isolation)")
    max_scopes: int = Field(1000, ge=1, description="tenant windows kept; further tenants share one")


class SigningConfig(Frozen):
    """HMAC-SHA256 over every verdict, review request and alert (worker/signing.py).

    The key comes from a Secret (``CTD_SIGNING__KEY``); ``key_id`` travels in the signature header so keys can be
    rotated: list the previous key under ``verify_keys`` until every record it signed is past retention.
    Without a key nothing is signed and nothing is checked (a local demo); with one, readers refuse records
    whose signature is missing or wrong.
    """

    key: SecretStr | None = None
    key_id: str = Field("k1", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    verify_keys: dict[str, SecretStr] = Field(default_factory=dict, description="key id -> older keys still accepted")
    required: bool = Field(False, description="refuse to start without a key (production: the key is a Secret)")

    @property
    def enabled(self) -> bool:
        return self.key is not None and bool(self.key.get_secret_value())


class ResponsesConfig(ServiceConfig):
    """The streamed-response service (worker/responses.py): chunks in, one terminal verdict per response out."""

    group_id: str = "ctd-responses"
    bundle: Path = Path("runs/bundle")
    max_event_bytes: int = Field(1_000_000, ge=1024)
    max_pending_chunks: int = Field(8, ge=0, description="out-of-order chunks held per response before a gap")
    response_timeout_s: float = Field(60.0, gt=0, description="a response with no chunk for this long is closed")
    kv_cache_max_bytes: int = Field(512 * 2**20, ge=0, description="KV caches held for open responses (LRU)")
    kv_cache_max_entries: int = Field(256, ge=0)
    # 64: a pass of few rows mostly pays for reading the weights (bench stream, README "Streamed responses");
    # a round only waits for the chunks that are ready, so a quiet stream still runs small passes at once.
    max_batch: int = Field(64, ge=1, description="open responses whose ready chunks share one forward pass")
    closed_memory: int = Field(10000, ge=1, description="closed response ids remembered to drop late chunks")


class ProcessingConfig(Frozen):
    """Delivery guarantee of a stream service's outputs (README "Delivery guarantees", worker/transactions.py).

    ``at_least_once``: outputs are sent as soon as they are built; a crash can answer an event twice (with the same
    decision). ``exactly_once``: each commit is one Kafka transaction per input partition holding the outputs and
    the offsets, so ``read_committed`` readers see every event answered once; outputs become visible at the commit
    (``commit_interval_s`` later) and each assigned partition holds a transactional producer. The streamed-response
    service refuses it (worker/responses.py says why).
    """

    guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    transactional_id_prefix: str = Field(
        "ctd", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
        description="transactional ids are <prefix>-<group>-<topic>-<partition>: one per input partition")
    transaction_timeout_ms: int = Field(
        60_000, ge=1000, description="the broker aborts a transaction left open this long (a producer killed "
        "mid-commit whose partition nobody takes over)")

    @property
    def exactly_once(self) -> bool:
        return self.guarantee == "exactly_once"


class WorkerAuditConfig(AuditConfig):
    """The audit sample in the monitor worker: off by default (``rate`` 0), see README "Online recalibration".

    Audited events go to the expert besides the delegated ones; every worker replica reads the guard's audit
    verdicts from the verdicts topic (no consumer group, worker/recalibration.py) and decides with the map and
    cut refitted on them.
    """

    rate: float = Field(0.0, ge=0, le=1, description="share of events audited (hash of the event id); 0: off")
    lookback_s: float = Field(
        86_400.0, gt=0, description="a starting worker rebuilds its window from the audit verdicts of this long ago")
    settle_s: float = Field(
        5.0, ge=0, description="an audit verdict is fed this long after it was decided, in (decided_at, event_id) "
        "order, so replicas that received them interleaved differently feed the same sequence")
    catch_up_timeout_s: float = Field(
        60.0, gt=0, description="longest wait for the lookback before joining the group (then the offline cut)")

    @property
    def enabled(self) -> bool:
        return self.rate > 0


class WorkerSettings(Settings):
    kafka: KafkaConfig = KafkaConfig()
    topics: TopicsConfig = TopicsConfig()
    batching: BatchingConfig = BatchingConfig()
    worker: WorkerConfig = WorkerConfig()
    budget: BudgetConfig = BudgetConfig()
    responses: ResponsesConfig = ResponsesConfig()
    signing: SigningConfig = SigningConfig()
    audit: WorkerAuditConfig = WorkerAuditConfig()
    processing: ProcessingConfig = ProcessingConfig()


class GuardConfig(ServiceConfig):
    """The guard service (``ctd-monitor expert``): review topic in, final expert verdicts out."""

    group_id: str = "ctd-guard"
    bundle: Path | None = Field(None, description="encoder-head: take the expert recorded in this bundle")
    max_batch: int = Field(16, ge=1, description="review requests scored together")
    max_wait_ms: float = Field(50.0, ge=0)
    max_in_flight: int = Field(256, ge=1, description="review requests fetched but not committed")
    expert_timeout_s: float = Field(60.0, gt=0, description="a batch slower than this counts as the expert down")
    retry_backoff_s: float = Field(1.0, gt=0, description="first wait before retrying a down expert (doubles)")
    retry_backoff_max_s: float = Field(30.0, gt=0)
    unsafe_threshold: float | None = Field(
        None, gt=0, lt=1, description="expert score at or above which a verdict is unsafe; default: the cut "
        "`calibrate` certified for this expert in guard.bundle, else 0.5")
    max_expert_attempts: int = Field(
        5, ge=1, description="timeouts of a single request before it is given up (fail closed, see below)")
    unavailable_decision: Literal["unsafe", "probe"] = Field(
        "unsafe", description="final decision when the expert fails for good: escalate as harmful, or the probe's")
    http_port: int = Field(8081, ge=0, le=65535)


class WebhookSinkConfig(Frozen):
    url: str
    timeout_s: float = Field(5.0, gt=0)
    retries: int = Field(5, ge=0)
    backoff_s: float = Field(0.5, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)


class AlertsConfig(Frozen):
    """Alerts on harmful final verdicts: the alerts topic always; log and webhook sinks optional.

    Alerts never carry conversation text (verdicts do not either): look the conversation up by event id.
    """

    enabled: bool = True
    on_probe_verdicts: bool = Field(True, description="alert on undelegated probe 'unsafe' verdicts too")
    dedupe_window_s: float = Field(600.0, ge=0, description="one alert per conversation within this window")
    rate_limit_per_s: float = Field(5.0, gt=0, description="token bucket per tenant (or over all alerts)")
    rate_limit_scope: Literal["tenant", "global"] = Field(
        "tenant", description="one bucket per tenant, so one tenant's alert flood cannot silence another's")
    rate_burst: int = Field(50, ge=1)
    critical_score: float = Field(0.9, gt=0, le=1, description="score at or above which severity is critical")
    probe_critical: bool = Field(False, description="probe-only verdicts may be critical (else warning at most)")
    include_metadata: bool = Field(False, description="copy the event's metadata into alert payloads")
    log_sink: bool = True
    webhooks: tuple[WebhookSinkConfig, ...] = ()
    group_id: str = "ctd-alerter"


class GuardSettings(Settings):
    kafka: KafkaConfig = KafkaConfig()
    topics: TopicsConfig = TopicsConfig()
    guard: GuardConfig = GuardConfig()
    alerts: AlertsConfig = AlertsConfig()
    signing: SigningConfig = SigningConfig()
    processing: ProcessingConfig = ProcessingConfig()
