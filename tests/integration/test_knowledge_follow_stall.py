"""The assistant's knowledge follower survives a Kafka client that stopped fetching
(aio-libs/aiokafka#983).

aiokafka fetches in a background task; when it ends (it swallows a cancellation and finishes
without a word), `getmany` returns nothing forever and raises nothing, so `follow()`'s retry never
ran: the follower looked alive and no document upserted afterwards was ever indexed. Real Kafka
and Redis; the fetch task is ended the way that issue describes.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import ClassVar

import pytest
from aiokafka import AIOKafkaConsumer
from switchboard.v1 import knowledge_pb2

from schemas import hotview as hv
from services.ingress._knowledge import record_key, upserted
from services.settings import Settings
from streams.assistant import _worker
from streams.assistant._worker import KnowledgeFollower
from streams.knowledge import KnowledgeBase
from tests.conftest import eventually
from tests.integration.knowledge_rig import cancel_quietly, knowledge_topic
from tests.integration.test_erasure_follower_stall import end_fetch_task

pytestmark = pytest.mark.integration


class RecordedConsumer(AIOKafkaConsumer):
    """Remembers the consumers the follower makes."""

    made: ClassVar[list[AIOKafkaConsumer]] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        RecordedConsumer.made.append(self)


@pytest.mark.timeout(180)
async def test_documents_upserted_after_the_client_stopped_fetching_are_indexed(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    RecordedConsumer.made = []
    monkeypatch.setattr(_worker, "AIOKafkaConsumer", RecordedConsumer)
    monkeypatch.setattr(_worker, "KNOWLEDGE_RETRY_INITIAL_S", 0.05)
    tenant = f"ks{uuid.uuid4().hex[:6]}"
    knowledge = KnowledgeBase()
    task = None
    async with knowledge_topic(local_stack) as (settings, producer, redis):
        follower = KnowledgeFollower(settings, knowledge, redis)

        async def upsert(i: int) -> None:
            doc = knowledge_pb2.Document(
                document_id=f"d-{i}", title=f"Article {i}", body=f"Parcel {i} ships."
            )
            await producer.send_and_wait(
                settings.knowledge_topic,
                key=record_key(tenant, doc.document_id),
                value=upserted(tenant, doc).SerializeToString(),
            )

        async def indexed() -> int:
            return int(await redis.hlen(hv.documents_key(tenant)))

        try:
            for i in range(2):
                await upsert(i)
            task = asyncio.create_task(follower.follow())
            await asyncio.wait_for(follower.ready.wait(), 60)
            assert await indexed() == 2
            await end_fetch_task(RecordedConsumer.made[-1])
            for i in range(2, 5):
                await upsert(i)
            await eventually(
                indexed, lambda n: n == 5, within_s=30, what="documents upserted after the fault"
            )
            # Read on where it had read up to: nothing read twice.
            assert follower.applied == 5
            assert not task.done()
        finally:
            await cancel_quietly(task)
