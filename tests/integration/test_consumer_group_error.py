"""A processor outlives an error its Kafka client hands up from group coordination.

Seen in a 30-cycle soak: Kafka was killed and restarted; its coordinator answered the assistant's
SyncGroup with GroupLoadInProgressError (the group's state still loading), which aiokafka treats
as unexpected and raises from the next `getmany` (`KafkaError: GroupLoadInProgressError()`).
BatchConsumer.run let it through, so the assistant process exited, and nothing answered customers
or dead-lettered poison until someone restarted it. aiokafka has already asked to rejoin when it
raises; polling again is all it takes. Here the error is handed up the way aiokafka does it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.kafka_topics import ensure_topics
from services.settings import Settings
from streams._consumer import BatchConsumer
from tests.integration.conftest import eventually
from tests.integration.test_consumer_stall import Collect

pytestmark = pytest.mark.integration


@pytest.mark.timeout(180)
async def test_a_group_coordination_error_does_not_end_the_consumer(local_stack: Settings) -> None:
    settings = local_stack.model_copy(update={"conversation_topic": f"grouperr-{uuid.uuid4().hex[:8]}"})
    await ensure_topics(settings)
    processor = Collect()
    consumer = BatchConsumer(
        settings,
        processor,
        topic=settings.conversation_topic,
        group_id=f"grouperr-{uuid.uuid4().hex[:8]}",
        instance_id=f"grouperr-{uuid.uuid4().hex[:8]}",
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
        before = [f"before-{i}".encode() for i in range(10)]
        for value in before:
            await producer.send_and_wait(settings.conversation_topic, value, key=b"k")
        await eventually(applied, lambda v: v == before, within_s=60, what="records before the error")

        # What aiokafka does with an unexpected SyncGroup error: hand it to the next poll.
        assert consumer._consumer is not None
        coordinator = consumer._consumer._coordinator
        coordinator.request_rejoin()
        waiting = asyncio.ensure_future(
            coordinator._push_error_to_user(KafkaError("GroupLoadInProgressError()"))
        )

        after = [f"after-{i}".encode() for i in range(10)]
        for value in after:
            await producer.send_and_wait(settings.conversation_topic, value, key=b"k")
        await eventually(applied, lambda v: v == before + after, within_s=60, what="records after the error")
        assert waiting.done()  # the error was taken by a poll
    finally:
        await consumer.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 10)
        await consumer.close()
        await producer.stop()
