"""The guard's answers to audit requests (in-memory consumer and producer, a scripted expert): an audit verdict
carries the marker, the probe's raw score and the ``audit`` header; only a delegation's verdict is final."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from aiokafka import ConsumerRecord

from probes.conversation import Conversation
from tests.worker.helpers import role_signer
from tests.worker.test_stream import P0, FakeConsumer, FakeProducer, running, stopped, until
from worker.config import GuardConfig, GuardSettings
from worker.events import AUDIT_HEADER, ConversationEvent, ReviewRequest, utcnow
from worker.guard import guard_stream
from worker.metrics import GuardMetrics
from worker.stream import ServiceLimits


class ScriptedExpert:
    """Scores "unsafe" conversations 0.9, the rest 0.1."""

    name = "scripted"

    def score(self, conversations: Sequence[Conversation]) -> npt.NDArray[np.float64]:
        return np.asarray([0.9 if "unsafe" in c[0].content else 0.1 for c in conversations])


class HeaderProducer(FakeProducer):
    """Also keeps each record's headers."""

    def __init__(self) -> None:
        super().__init__(auto_ack=True)
        self.headers: list[dict[str, bytes]] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> Any:
        self.headers.append(dict(headers or ()))
        return await super().send(topic, value, key, headers)


def _request(event_id: str, text: str, *, delegated: bool, audit: bool, p: float,
             features: list[float] | None = None) -> bytes:
    event = ConversationEvent(event_id=event_id, conversation_id=f"c-{event_id}", created_at=utcnow(),
                              messages=[{"role": "user", "content": text}])  # type: ignore[list-item]
    return ReviewRequest(event=event, p_unsafe=p, dv=None, reason="test", threshold=None, bundle_version="b",
                         requested_at=utcnow(), delegated=delegated, audit=audit, probe_features=features).to_json()


async def test_audit_requests_are_answered_as_labels_with_the_probes_score() -> None:
    values = [
        # (a delegation's activations are not the workers' business: only an audit's are copied)
        _request("delegated", "unsafe text", delegated=True, audit=False, p=0.55, features=[9.0, 9.0]),
        _request("audit", "unsafe text", delegated=False, audit=True, p=0.2, features=[0.25, -1.5, 3.0]),
        _request("both", "benign text", delegated=True, audit=True, p=0.6),
    ]
    consumer = FakeConsumer({P0: len(values)})
    worker = role_signer("worker")  # review requests are the worker role's records
    consumer.log[P0] = [ConsumerRecord(topic=P0.topic, partition=0, offset=i, timestamp=0, timestamp_type=0, key=None,
                                       value=v, checksum=None, serialized_key_size=0, serialized_value_size=len(v),
                                       headers=tuple(worker.headers("review_request", None, v)))
                        for i, v in enumerate(values)]
    settings = GuardSettings(guard=GuardConfig(unsafe_threshold=0.5, max_wait_ms=0))
    metrics = GuardMetrics()
    stream = guard_stream(settings, ScriptedExpert(), metrics, serve_http=False)  # type: ignore[arg-type]
    producer = HeaderProducer()
    stream.consumer, stream.producer = consumer, producer
    stream.limits = ServiceLimits(max_in_flight=100, max_event_bytes=1 << 20, shutdown_deadline_s=5,
                                  commit_interval_s=0.01, liveness_max_stall_s=60, http_port=None)
    task = await running(stream)  # type: ignore[arg-type]
    await until(lambda: consumer.last_commit(P0) == len(values))
    await stopped(stream, task)
    out: dict[str, dict[str, Any]] = {}
    for (topic, value, _), headers in zip(producer.sent, producer.headers, strict=True):
        assert topic == settings.topics.verdicts
        verdict = orjson.loads(value)
        out[verdict["event_id"]] = verdict
        # the header lets the workers' feeds skip every other verdict unparsed
        assert (AUDIT_HEADER in headers) == verdict.get("audit", False)
    assert {e: (v["source"], v["decision"], v["delegated"], v.get("audit", False), v.get("probe_p_unsafe"))
            for e, v in out.items()} == {
        "delegated": ("expert", "unsafe", True, False, None),  # as before audits existed: no new fields
        "audit": ("expert", "unsafe", False, True, 0.2),  # a label: the probe's verdict on it stands
        "both": ("expert", "safe", True, True, 0.6),  # final (delegated) and a label
    }
    assert metrics.audit_verdicts_out._value.get() == 2
    # audit.refit=head: the audited event's pooled activations travel back to the workers' feeds
    assert {e: v.get("probe_features") for e, v in out.items()} == {
        "delegated": None, "audit": [0.25, -1.5, 3.0], "both": None}

