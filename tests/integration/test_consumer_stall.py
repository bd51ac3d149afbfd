"""The stall watchdog: a consumer whose Kafka client stopped returning records is started again.

aiokafka fetches in a background task and `getmany` only reads what that task buffered. When the
task ends (aio-libs/aiokafka#983: it swallows a cancellation and finishes without a word), every
poll returns nothing, forever, with records waiting: a processor that looks alive and applies
nothing. Here the fetch task is ended the way that issue describes (and, for any other way a
client stops fetching, its partitions are paused), and what is produced after it must still be
applied, once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence

import pytest
from aiokafka import AIOKafkaProducer

from services.kafka_topics import ensure_topics
from services.settings import Settings
from streams import _consumer
from streams._consumer import BatchConsumer, PartitionControl, Record, Rejected
from tests.integration.conftest import eventually

pytestmark = pytest.mark.integration


class Collect:
    name = "stall-test"

    def __init__(self) -> None:
        self.values: list[bytes] = []

    async def on_assigned(self, partitions: set[int], consumer: PartitionControl) -> None:
        # Where Kafka's committed offsets say (the consumer's default): nothing to seek.
        return None

    async def on_revoked(self, partitions: set[int]) -> None:
        return None

    async def idle(self, consumer: PartitionControl) -> None:
        return None

    async def healthy(self) -> bool:
        return True

    async def process(self, records: Sequence[Record]) -> Rejected:
        self.values.extend(r.value or b"" for r in records)
        return []


async def _stall_and_recover(settings: Settings, fault: str) -> None:
    """Apply 20 records, inject `fault` into the consumer, produce 20 more: all 40 must be applied,
    once, in order, after exactly one restart."""
    processor = Collect()
    consumer = BatchConsumer(
        settings,
        processor,
        topic=settings.conversation_topic,
        group_id=f"stall-{uuid.uuid4().hex[:8]}",
        instance_id=f"stall-{uuid.uuid4().hex[:8]}",
        batch_size=64,
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    await consumer.start()
    running = asyncio.ensure_future(consumer.run())

    async def applied() -> list[bytes]:
        assert not running.done(), running
        return list(processor.values)

    try:
        before = [f"before-{i}".encode() for i in range(20)]
        for value in before:
            await producer.send_and_wait(settings.conversation_topic, value, key=b"k")
        await eventually(applied, lambda v: v == before, within_s=60, what="records before the fault")
        kafka = consumer._consumer
        assert kafka is not None
        if fault == "fetch task ended":
            # The fault of aiokafka#983: the fetch task ends, and nothing says so.
            fetch_task = kafka._fetcher._fetch_task
            fetch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fetch_task
            assert fetch_task.done() and not fetch_task.cancelled()  # it swallowed the cancellation
        else:
            # Any other way a client stops fetching with records waiting: polls return nothing.
            kafka.pause(*kafka.assignment())
        after = [f"after-{i}".encode() for i in range(20)]
        for value in after:
            await producer.send_and_wait(settings.conversation_topic, value, key=b"k")
        await eventually(
            applied, lambda v: v == before + after, within_s=60, what=f"records after the fault ({fault})"
        )
        assert consumer.stats.restarts == 1
    finally:
        await consumer.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 10)
        await consumer.close()
        await producer.stop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", ["fetch task ended", "partitions not fetched"])
async def test_a_consumer_that_stopped_fetching_is_started_again(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    # Shorter bounds than production's, so the test takes seconds; the logic is the same.
    monkeypatch.setattr(_consumer, "STALL_CHECK_EVERY_S", 0.5)
    monkeypatch.setattr(_consumer, "STALL_BOUND_S", 2.0)
    settings = local_stack.model_copy(update={"conversation_topic": f"stall-{uuid.uuid4().hex[:8]}"})
    await ensure_topics(settings)
    await _stall_and_recover(settings, fault)
