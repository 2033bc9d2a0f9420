"""The stream core's per-partition backpressure: one partition held back pauses alone, the others flow."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import ConsumerRecord

from tests.worker.test_stream import P0, P1, FakeConsumer, FakeProducer, until
from worker.config import KafkaConfig
from worker.metrics import ConsumerMetrics
from worker.stream import Envelope, Message, OutputsSlot, ServiceLimits, Stream


class HoldP0(OutputsSlot):
    """Holds every record of partition 0 (as an open streamed response holds its chunks); echoes the others."""

    name = "hold"

    def __init__(self) -> None:
        self.held: list[Envelope[bytes]] = []
        self.holding = True

    async def accept(self, records: Sequence[ConsumerRecord[bytes, bytes]]) -> None:
        for r in records:
            item = Envelope.of(r, r.value or b"", 0.0)
            if item.tp == P0 and self.holding:
                self.held.append(item)
            else:
                self.out.publish(item, [Message("out", item.value, None)])

    async def run(self) -> None:
        await asyncio.Event().wait()

    def busy(self) -> bool:
        return False

    def waiting_on_purpose(self) -> bool:
        return True

    def wake(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_a_partition_held_back_pauses_alone() -> None:
    consumer, producer = FakeConsumer({P0: 100, P1: 50}), FakeProducer(auto_ack=True)
    handler = HoldP0()
    limits = ServiceLimits(max_in_flight=40, max_event_bytes=1 << 20, shutdown_deadline_s=1.0,
                           commit_interval_s=0.01, liveness_max_stall_s=60, http_port=None,
                           max_in_flight_per_partition=5)
    stream = Stream(handler, kafka=KafkaConfig(), group_id="g", topic="in", dead_letter_topic="dlq", limits=limits,
                    metrics=ConsumerMetrics(), consumer=consumer, producer=producer)
    task = asyncio.create_task(stream.run())
    await until(lambda: consumer.last_commit(P1) == 50, timeout=10)
    await until(lambda: P1 not in consumer.paused, timeout=10)  # (paused a moment while its fetch was in flight)
    assert P0 in consumer.paused
    assert len(handler.held) < 10  # at most the limit plus one fetch
    handler.holding = False
    for item in handler.held:  # the held records finish: the partition resumes and is read to its end
        stream.outputs.done(item)  # type: ignore[union-attr]
    await until(lambda: consumer.last_commit(P0) == 100, timeout=10)
    stream.stop()
    await asyncio.wait_for(task, 10)
