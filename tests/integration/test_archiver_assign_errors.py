"""The archiver takes its partitions after a failed read of its position that is no outage.

`on_assigned` reads where each partition's archive continues from S3; it retried outages, and let
any other error through. aiokafka runs it as a rebalance listener and only logs what it raises, so
the partitions stayed assigned but never ready: process() skipped their records (and the consumer
committed past them) while the archiver looked alive, with nothing archived until the next
rebalance or restart. Real Kafka and SeaweedFS; the error is minio's own S3Error (an answer such
as a 403), raised where the store raises it, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from minio.error import S3Error
from urllib3 import HTTPResponse

from services.settings import Settings
from streams.archive import ArchiveStore, archiver_consumer
from tests.conftest import eventually

pytestmark = pytest.mark.integration


class RefusesOnce(ArchiveStore):
    """The first read of a partition's position is refused as S3 refuses a request."""

    refusals = 1

    def next_offset(self, topic: str, partition: int) -> int | None:
        if self.refusals:
            self.refusals -= 1
            raise S3Error(
                HTTPResponse(status=403), "AccessDenied", "Access Denied.", f"/{topic}", "req", "host"
            )
        return super().next_offset(topic, partition)


@pytest.mark.timeout(180)
async def test_a_partition_whose_position_read_was_refused_once_is_archived(local_stack: Settings) -> None:
    settings = local_stack.model_copy(update={"archive_segment_age_s": 1.0})
    topic = f"archive-assign-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(20):
            await producer.send(topic, key=b"k", value=f"v{i}".encode(), partition=0)
        await producer.flush()
    finally:
        await producer.stop()
    store = RefusesOnce(settings, prefix=f"assign-{uuid.uuid4().hex[:8]}")
    consumer, _ = archiver_consumer(settings, store, topic)
    await consumer.start()
    running = asyncio.ensure_future(consumer.run())

    async def archived() -> int | None:
        assert not running.done(), running
        return await asyncio.to_thread(ArchiveStore.next_offset, store, topic, 0)

    try:
        await eventually(archived, lambda n: n == 20, within_s=60, what="the partition archived")
        assert store.refusals == 0
    finally:
        await consumer.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 10)
        await consumer.close()
