"""Streaming settings: Kafka connection, topics, batching, budget and runtime limits (frozen pydantic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from probes.config import AuditConfig, Frozen, Settings

# Room above worker.max_event_bytes in the topics' max.message.bytes: key, headers and batch framing (topics.py).
RECORD_OVERHEAD_BYTES = 65_536

#: The default worker.decision_logit_margin per compute dtype: about twice the largest batch-to-batch logit spread
#: measured on the demo bundle (SmolLM2-135M, 320 events of 8 sources, scripts/decision_spread.py): 0.52 in bf16,
#: 3e-5 in fp32 (the fp32 default is kept well above its spread: other kernels and devices reduce in other orders).
BF16_DECISION_LOGIT_MARGIN = 1.0
FP32_DECISION_LOGIT_MARGIN = 0.01


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
    response_state: str = Field(
        "response-state", description="checkpoints of open streamed responses (compacted, key: response_id)")

    def suffixed(self, suffix: str) -> TopicsConfig:
        """The same topic set under unique names (benchmarks and tests share one broker)."""
        return TopicsConfig(**{name: f"{topic}-{suffix}" for name, topic in self.model_dump().items()})

    def partitions(self, input_partitions: int, output_partitions: int = 3) -> dict[str, int]:
        """Topic → partition count for creating the whole set; workers scale up to ``input_partitions``."""
        return {self.input: input_partitions, self.verdicts: output_partitions, self.review: output_partitions,
                self.dead_letter: 1, self.alerts: 1, self.responses: input_partitions,
                self.response_verdicts: output_partitions, self.response_state: output_partitions}


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
        description="the hard transport limit: larger records are dead-lettered (oversize); topics are created "
        "with room for this (worker/topics.py), so the broker refuses larger ones to their producer")
    max_metadata_depth: int = Field(16, ge=1, le=64, description="deeper event metadata is dead-lettered")
    max_metadata_bytes: int = Field(16_384, ge=2, description="larger event metadata (as JSON) is dead-lettered")
    inference_retries: int = Field(
        1, ge=0, description="retries (with backoff) of an event the model fails on alone, before its dead letter")
    inference_retry_backoff_s: float = Field(0.5, gt=0, description="first wait before such a retry (doubles)")
    decision_logit_margin: float | None = Field(
        None, ge=0, le=10, description="an event whose score lies within this distance of the unsafe cut, in the "
        "head's logit (the unit batch-to-batch noise acts in), is scored again from the rows that can decide it, "
        "each forwarded on its own, so its decision does not depend on its batch (a redelivered duplicate decides "
        f"the same); None: by the model's compute dtype, {BF16_DECISION_LOGIT_MARGIN} in bf16/fp16 and "
        f"{FP32_DECISION_LOGIT_MARGIN} in fp32 (README \"Delivery guarantees\": spreads measured up to 0.52 and "
        "3e-5); 0: off")
    long_dialogue_cut: bool = Field(
        False, description="flag a long dialogue (an assistant turn and over model.windows.dialogue_chars of content) "
        "only at or above the bundle's long-conversation cut too: its benign flag rate is then certified ≤ ε, at the "
        "price of much of the harm in long dialogues (docs/method.md §6c); off: they are flagged at the probe's cut, "
        "which flags most benign long dialogues read whole as well. Whoever writes the conversation can make a request "
        "a long dialogue (a fake assistant turn), so this also lets a producer opt it into the higher cut")
    breaker_failures: int = Field(
        5, ge=1, description="events given up in a row (no batch scored between) that open the circuit breaker: "
        "/healthz/live turns red and inference pauses (breaker_cooldown_s, doubling) instead of dead-lettering all")
    breaker_cooldown_s: float = Field(30.0, gt=0, description="first pause of an open breaker (doubles, ≤ 10 min)")
    # Every conversation gets a verdict (worker/decode.py, ViewLimits): past these an event is scored on a view.
    view_max_messages: int = Field(512, ge=2, le=512, description="more messages: scored on the bounded view")
    view_max_bytes: int = Field(
        1_000_000, ge=1024, description="more message content (UTF-8 bytes): scored on the bounded view, "
        "which keeps at most this much")
    view_head_messages: int = Field(16, ge=1, description="first messages a bounded view keeps")
    view_tail_messages: int = Field(240, ge=1, description="last messages a bounded view keeps")
    view_message_bytes: int = Field(
        65_536, ge=256, description="a message of a bounded view keeps its first and last halves of this many bytes")

    @model_validator(mode="after")
    def _view_fits(self) -> WorkerConfig:
        if self.view_head_messages + self.view_tail_messages > 512:
            raise ValueError("view_head_messages + view_tail_messages > 512 (the most messages an event holds)")
        if self.view_message_bytes > self.view_max_bytes:
            raise ValueError("view_message_bytes cannot exceed view_max_bytes")
        return self


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
    max_scopes: int = Field(
        1000, ge=1, description="tenant windows kept; a new tenant takes the least recently used window's place "
        "once that one is idle (scope_idle_events), else shares one overflow window")
    scope_idle_events: int = Field(
        10_000, ge=1, description="a tenant window no event used for this many decisions may be evicted")


class MetricsConfig(Frozen):
    """Bounds on the ``tenant`` label of ``ctd_verdicts_out`` and ``ctd_alerts_raised`` (worker/metrics.py,
    TenantLabels), and of the budget gauges' ``scope`` label under budget.scope tenant.

    Tenant names can be many, and under tenant.source payload whoever produces chooses them: one series per name
    would let them grow Prometheus without bound. The tenants named here always have a label value of their own;
    up to ``max_tenant_labels`` others hold one while they are active (the least recently used gives its place to a
    new tenant once idle for ``tenant_label_idle_events`` label lookups, and its series are removed); the rest are
    counted under ``other``.
    """

    tenant_labels: tuple[str, ...] = Field(
        (), description="tenants always labelled by name (never evicted, outside max_tenant_labels)")
    max_tenant_labels: int = Field(
        50, ge=0, description="other tenants labelled by name at a time; beyond them a tenant counts as 'other'")
    tenant_label_idle_events: int = Field(
        10_000, ge=1, description="a tenant label no verdict (alert, in the alerter) used for this many may be "
        "given to a new tenant")


class TenantConfig(Frozen):
    """Where an event's tenant comes from (worker/tenancy.py): the identity every isolation mechanism keys on.

    ``topic`` (default): one input topic per tenant, ``<topics.input>.<tenant>``, writable only by that tenant's
    principal (Kafka ACLs); the plain input topic's events belong to ``default``. ``header``: a gateway in front of
    Kafka sets ``ctd-tenant`` and ``ctd-tenant-auth`` (HMAC-SHA256 under ``gateway_secret``, worker/tenant_auth.py);
    an event without a valid pair is scored under ``unverified``. ``payload``: the producer-written ``tenant``
    field (insecure: any producer can claim any tenant; logged as such at start). Whatever the payload says is
    recorded in the verdict (``claimed_tenant``) and never keys isolation unless ``source`` is ``payload``.
    """

    source: Literal["topic", "header", "payload"] = "topic"
    default: str = Field("default", min_length=1, max_length=256, description="tenant of the plain input topic")
    unverified: str = Field("unverified", min_length=1, max_length=256,
                            description="header source: tenant of events whose gateway header is missing or wrong")
    gateway_secret: SecretStr | None = Field(None, description="header source: the gateway's HMAC key (a Secret)")
    gateway_max_age_s: float | None = Field(
        None, gt=0, description="header source: an older gateway timestamp counts as unverified (None: no bound)")
    topic_refresh_ms: int = Field(
        30_000, ge=1000, description="topic source: how soon a newly created tenant topic is subscribed")
    max_in_flight_bytes: int = Field(
        16_000_000, ge=1, description="event bytes one tenant may have between tokenization and its verdict; "
        "the rest waits its turn (one event always may, however large)")
    max_waiting_share: float = Field(
        0.5, gt=0, le=1, description="share of worker.max_in_flight one tenant's waiting events may take before "
        "the partitions feeding them pause (others keep flowing; nothing is dropped)")
    fair_quantum_bytes: int = Field(
        65_536, ge=1, description="bytes each waiting tenant may send to tokenization per round (deficit round robin)")


class SigningConfig(Frozen):
    """Ed25519 signatures per role on verdicts, review requests, stream verdicts and alerts (worker/signing.py).

    Secure by default: every service needs its keys in ``keys_dir`` (``ctd-monitor keys --out DIR`` writes them;
    in Kubernetes, Secrets mounted there) and refuses to start without them. The worker holds ``worker.key`` and
    ``guard.pub`` (audits), the guard ``guard.key`` and ``worker.pub``; the alerter (in the guard process) reads
    ``worker.pub`` and ``guard.pub``. ``insecure_dev`` lets a service run without the keys it lacks, loudly (a
    warning at start and ``ctd_signing_insecure`` 1): records are then written unsigned or read unchecked.
    """

    keys_dir: Path | None = Field(
        None, description="directory of <role>.key (this service's private key), <role>.pub and <role>.*.pub "
        "(trusted public keys, several while rotating) and audit.secret; CTD_SIGNING__KEYS_DIR")
    max_age_s: float = Field(
        900.0, gt=0, description="a signed record appended (LogAppendTime topics) or, else, read more than this "
        "long after it was signed is refused as a replay")
    max_skew_s: float = Field(60.0, ge=0, description="clock skew allowed for a signing time in the future")
    insecure_dev: bool = Field(
        False, description="development only: run without missing keys (unsigned / unchecked), logged loudly")


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
    max_chunks_per_response: int = Field(
        4096, ge=1, description="a response with more chunks is stopped (reason limit) and the rest dead-lettered")
    max_response_bytes: int = Field(
        1_000_000, ge=1024, description="a response with more text (UTF-8) is stopped (limit), the rest dead-lettered")
    rolling_stride_tokens: int | None = Field(
        None, ge=1, description="past the bundle's window (stream.max_response_tokens, W) a response is read in "
        "blocks of this many tokens, each on the prefix and the W - stride tokens before it; None: W/4")
    max_read_tokens: int = Field(
        8192, ge=8, description="response tokens read at most (>= W): a longer response is stopped (reason limit) "
        "with an alert, never allowed unread; checkpoints hold ~26 bytes a read token")
    checkpoint: bool = Field(
        True, description="scored chunks are committed once the response's state is checkpointed on the "
        "response-state topic; off: every chunk of an open response stays uncommitted until its verdict")
    partition_max_in_flight: int = Field(
        512, ge=1, description="a partition whose uncommitted chunks reach this pauses alone (max_in_flight: all)")


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
    secret_file: Path | None = Field(
        None, description="the secret keying the audit sample (HMAC of the event id): producers cannot tell or "
        "choose which events are audited; default audit.secret in signing.keys_dir (ctd-monitor keys writes it). "
        "Audits refuse to run without it unless signing.insecure_dev")
    tenant_share: float = Field(
        0.25, gt=0, le=1, description="most of the audit window one tenant's audits may hold (its newest replace "
        "its oldest): no tenant fills the window or moves the cut alone; 1 for a single-tenant deployment")
    tenant_rate_per_s: float = Field(
        1.0, gt=0, description="audits per second one tenant may send to the expert, per worker (token bucket)")
    tenant_burst: int = Field(20, ge=1, description="audits one tenant may send in a burst")
    max_per_s: float = Field(
        10.0, gt=0, description="the audit budget: audits per second sent to the expert, per worker, apart from "
        "the delegation budget alpha (audits never count as delegations)")
    burst: int = Field(100, ge=1, description="audits sent in a burst within the audit budget")

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
    tenant: TenantConfig = TenantConfig()
    processing: ProcessingConfig = ProcessingConfig()
    metrics: MetricsConfig = MetricsConfig()


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
    long_dialogue_cut: bool | None = Field(
        None, description="decide a long dialogue (an assistant turn and over the certified windows.dialogue_chars of "
        "content) at or above the expert's long-conversation cut in guard.bundle too, read as that cut was certified "
        "(long_calibration.expert_read: by default the more unsafe of the whole and its user turns alone): its benign "
        "flag rate is then certified ≤ ε on long benign dialogues (docs/method.md §6c). true: required (the guard "
        "refuses to start without such a cut for its expert); false: off, a long dialogue is read whole at the "
        "expert's cut, whose flag rate on them nothing bounds; unset (default): on where the bundle's long cut reads the "
        "user turns too (measured better on both counts: fewer benign and more harmful long dialogues flagged, and a "
        "fake assistant turn cannot hide a request), else off (logged)")
    max_expert_attempts: int = Field(
        5, ge=1, description="timeouts of a single request before it is given up (fail closed, see below)")
    unavailable_decision: Literal["unsafe", "probe"] = Field(
        "unsafe", description="final decision when the expert fails for good: escalate as harmful, or the probe's "
        "(its verdict's decision, at the cut in force then)")
    decision_logit_margin: float = Field(
        0.1, ge=0, le=10, description="a request the in-process expert scores within this distance of its cut (in "
        "logits) is scored again in a batch of its own, so a redelivered request gets the same decision whatever it "
        "was batched with (the demo's encoder-head expert in bf16 moved by up to 0.036 logit between batchings, and "
        "0.1 re-scores 5 % of requests: README \"Delivery guarantees\"); an expert behind HTTP batches as its server "
        "does, and is not re-scored; 0: off")
    http_port: int = Field(8081, ge=0, le=65535)
    inference_retries: int = Field(
        1, ge=0, description="retries (backoff from retry_backoff_s) of a request the expert errors on alone, "
        "before it is given up as expert_unavailable")
    breaker_failures: int = Field(
        5, ge=1, description="requests given up in a row (no batch scored between) that open the circuit breaker: "
        "/healthz/live turns red and scoring pauses (breaker_cooldown_s, doubling) instead of giving up everything")
    breaker_cooldown_s: float = Field(30.0, gt=0, description="first pause of an open breaker (doubles, ≤ 10 min)")
    max_abandoned_calls: int = Field(
        16, ge=1, description="local expert calls left running past expert_timeout_s (each on its own thread) "
        "before new calls are refused and liveness turns red (worker/lanes.py); one wedged request in a full batch "
        "leaves up to log2(max_batch) + max_expert_attempts of them")


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
    max_tenant_buckets: int = Field(
        10_000, ge=1, description="tenant buckets kept; only a refilled bucket is evicted, else new tenants share one")
    sink_tenant_share: float = Field(
        0.1, gt=0, le=1, description="share of a sink's queue one tenant's alerts may hold")
    critical_score: float = Field(0.9, gt=0, le=1, description="score at or above which severity is critical")
    probe_critical: bool = Field(False, description="probe-only verdicts may be critical (else warning at most)")
    include_metadata: bool = Field(False, description="copy the event's metadata into alert payloads")
    log_sink: bool = True
    webhooks: tuple[WebhookSinkConfig, ...] = ()
    group_id: str = "ctd-alerter"


class SweeperConfig(Frozen):
    """The delegation sweeper in the alerter (worker/sweeper.py): a delegated event whose review has not completed
    within ``deadline_s`` gets a final ``expert_unavailable`` verdict (``guard.unavailable_decision``) and an alert."""

    enabled: bool = Field(True, description="on whenever the alerter runs (alerts.enabled)")
    deadline_s: float = Field(
        900.0, gt=0, description="probe verdict to final verdict; past it the sweeper finalises the event")
    lookback_s: float = Field(
        3600.0, gt=0, description="verdicts replayed when a partition is assigned, to rebuild the state")
    max_pending: int = Field(50_000, ge=1, description="delegated events tracked; past it the oldest is swept early")
    check_interval_s: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _lookback_covers_the_deadline(self) -> SweeperConfig:
        if self.lookback_s < self.deadline_s:
            raise ValueError("sweeper.lookback_s must be at least sweeper.deadline_s")
        return self


class GuardSettings(Settings):
    kafka: KafkaConfig = KafkaConfig()
    topics: TopicsConfig = TopicsConfig()
    guard: GuardConfig = GuardConfig()
    alerts: AlertsConfig = AlertsConfig()
    signing: SigningConfig = SigningConfig()
    sweeper: SweeperConfig = SweeperConfig()
    processing: ProcessingConfig = ProcessingConfig()
    metrics: MetricsConfig = MetricsConfig()
