"""Streaming settings: Kafka connection, topics, batching, budget and runtime limits (frozen pydantic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr

from probes.config import Frozen, Settings


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


class TopicsConfig(Frozen):
    input: str = "conversations"
    verdicts: str = "verdicts"
    review: str = "expert-review"
    dead_letter: str = "ctd-dead-letter"
    alerts: str = "ctd-alerts"

    def suffixed(self, suffix: str) -> TopicsConfig:
        """The same topic set under unique names (benchmarks and tests share one broker)."""
        return TopicsConfig(**{name: f"{topic}-{suffix}" for name, topic in self.model_dump().items()})

    def partitions(self, input_partitions: int, output_partitions: int = 3) -> dict[str, int]:
        """Topic → partition count for creating the whole set; workers scale up to ``input_partitions``."""
        return {self.input: input_partitions, self.verdicts: output_partitions, self.review: output_partitions,
                self.dead_letter: 1, self.alerts: 1}


class BatchingConfig(Frozen):
    max_batch_tokens: int = Field(8192, ge=64)
    max_items: int = Field(64, ge=1)
    max_wait_ms: float = Field(20.0, ge=0)
    lookahead: int = Field(512, ge=1)


class WorkerConfig(Frozen):
    bundle: Path = Path("runs/bundle")
    max_in_flight: int = Field(2048, ge=1, description="events fetched but not committed before fetching pauses")
    max_event_bytes: int = Field(1_000_000, ge=1024)
    shutdown_deadline_s: float = Field(25.0, gt=0, description="drain + flush + commit + leave, all of it")
    commit_interval_s: float = Field(1.0, gt=0)
    http_host: str = "0.0.0.0"
    http_port: int = Field(8080, ge=0, le=65535)
    liveness_max_stall_s: float = Field(120.0, gt=0)
    inference_retries: int = Field(1, ge=0)


class WorkerSettings(Settings):
    kafka: KafkaConfig = KafkaConfig()
    topics: TopicsConfig = TopicsConfig()
    batching: BatchingConfig = BatchingConfig()
    worker: WorkerConfig = WorkerConfig()
