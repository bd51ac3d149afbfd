"""A read of the erasure registry that outlasts its bound resumes where it had read up to.

Found by review: each read to the topic's end is bounded (CATCH_UP_BOUND_S), and a read that
failed started over from the beginning with a new consumer. A topic whose read takes longer than
the bound (a large registry, a slow Kafka) was then never read: every attempt stopped at the bound
and the next began again at offset 0, so the follower never became ready (every processor batch
refused as an outage, the ingress NOT_SERVING) however long it tried. Real Kafka; the client is
slowed to a page of records per fetch.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.events import encode_event
from services.kafka_topics import ensure_topics
from services.settings import Settings
from streams.privacy import erasures
from streams.privacy._erase import erasure_event
from streams.privacy.erasures import ErasureFollower

pytestmark = pytest.mark.integration

RECORDS = 400
PAGE = 40
PAGE_S = 0.1  # so a whole read takes ~1 s, and the bound below stops every attempt half-way
BOUND_S = 0.6


class SlowConsumer(AIOKafkaConsumer):
    async def getmany(self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        await asyncio.sleep(PAGE_S)
        return await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=PAGE)


class SlowFollower(ErasureFollower):
    made = 0

    def _new_consumer(self) -> AIOKafkaConsumer:
        self.made += 1
        return SlowConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=erasures.FOLLOW_FETCH_WAIT_MS,
        )


@pytest.mark.timeout(180)
async def test_a_read_longer_than_its_bound_goes_on_where_it_stopped(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(erasures, "CATCH_UP_BOUND_S", BOUND_S)
    settings = local_stack.model_copy(update={"privacy_topic": f"privacy-{uuid.uuid4().hex[:8]}"})
    await ensure_topics(settings)
    tenant = f"t{uuid.uuid4().hex[:10]}"
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(RECORDS):
            event = erasure_event(tenant, f"cust-{i}", [f"conv-{i}"], "test", time.time_ns())
            await producer.send(settings.privacy_topic, encode_event(event), key=event.event_id.encode())
        await producer.flush()
    finally:
        await producer.stop()
    follower = SlowFollower(settings, start_timeout_s=60)
    try:
        registry = await follower.start()
        assert all(registry.conversation_erased(tenant, f"conv-{i}") for i in range(RECORDS))
        assert follower.made > 1  # the bound did stop a read (else this tests nothing)
    finally:
        await follower.stop()
