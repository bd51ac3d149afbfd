"""The delivery-gap guard finds records a consumer skipped and reads them from real Kafka."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import OffsetAndMetadata

from services.settings import Settings
from streams._gaps import DeliveryGapGuard

pytestmark = pytest.mark.integration


@dataclass
class Position:
    partition: int
    offset: int


@dataclass
class Delivered:
    message: Position


async def test_gaps_after_the_committed_offset_and_between_batches_are_read_back(
    local_stack: Settings,
) -> None:
    bootstrap = local_stack.kafka_bootstrap
    topic, group = f"gaps-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for i in range(12):
            await producer.send_and_wait(topic, f"v{i}".encode(), key=b"k", partition=0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(2, "")})
    finally:
        await consumer.stop()

    guard = DeliveryGapGuard(bootstrap, topic, group)
    # Resuming at the committed offset 2, the first delivered record is 5: 2, 3, 4 were skipped.
    missing = await guard.missing_before([Delivered(Position(0, 5)), Delivered(Position(0, 6))])
    assert [(r.message.offset, r.value) for r in missing] == [(2, b"v2"), (3, b"v3"), (4, b"v4")]
    # Contiguous deliveries have no gap; a jump inside the stream does.
    assert await guard.missing_before([Delivered(Position(0, 7))]) == []
    missing = await guard.missing_before([Delivered(Position(0, 10))])
    assert [r.message.offset for r in missing] == [8, 9]
    # A partition without a committed offset starts wherever delivery starts.
    assert await guard.missing_before([Delivered(Position(1, 0))]) == []
    # After a reassignment, positions come from the committed offsets again.
    guard.reset()
    assert await guard.missing_before([Delivered(Position(0, 2))]) == []
    assert guard.filled == 5
