"""The assistant's knowledge follower becomes ready once what it read at start is indexed, even
while upserts keep coming (real Kafka and Redis).

`serve_assistant` answers no conversation before `follower.ready`. With the per-tenant queue
(streams/knowledge/_fair.py) `ready` waited for the queue to be empty: a steady trickle of upserts
(one tenant's sync job) that the indexer never quite drained kept a restarted assistant from
answering anyone for as long as the trickle lasted.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable

import pytest
from aiokafka import AIOKafkaProducer
from switchboard.v1 import knowledge_pb2

from schemas import hotview as hv
from services.ingress._knowledge import record_key, upserted
from services.settings import Settings
from streams.assistant._worker import KnowledgeFollower
from streams.knowledge import Document, KnowledgeBase
from tests.integration.knowledge_rig import cancel_quietly, knowledge_topic

pytestmark = pytest.mark.integration


class SlowKnowledgeBase(KnowledgeBase):
    """Embedding takes a while (as the encoder does on a loaded machine): 0.5 s per turn."""

    def upsert(self, tenant_id: str, documents: Iterable[Document]) -> int:
        time.sleep(0.5)
        return super().upsert(tenant_id, documents)


async def _send(
    producer: AIOKafkaProducer, topic: str, tenant_id: str, document_id: str, *, wait: bool = True
) -> None:
    doc = knowledge_pb2.Document(document_id=document_id, title=document_id, body="Ships in 2 days.")
    sent = await producer.send(
        topic, key=record_key(tenant_id, document_id), value=upserted(tenant_id, doc).SerializeToString()
    )
    if wait:
        await sent


@pytest.mark.timeout(120)
async def test_the_follower_is_ready_once_its_start_up_read_is_indexed_while_upserts_keep_coming(
    local_stack: Settings,
) -> None:
    a, b = f"ka{uuid.uuid4().hex[:8]}", f"kb{uuid.uuid4().hex[:8]}"
    async with knowledge_topic(local_stack) as (settings, producer, redis):
        follower = KnowledgeFollower(settings, SlowKnowledgeBase(), redis)
        stop = asyncio.Event()

        async def trickle() -> None:
            # Another tenant's sync job: a document every 20 ms, many per 0.5 s turn.
            n = 0
            while not stop.is_set():
                await _send(producer, settings.knowledge_topic, b, f"b-{n}", wait=False)
                n += 1
                await asyncio.sleep(0.02)

        following = trickling = None
        try:
            for i in range(20):
                await _send(producer, settings.knowledge_topic, a, f"a-{i}")
            trickling = asyncio.create_task(trickle())
            await asyncio.sleep(0.3)  # the trickle is under way when the assistant starts
            following = asyncio.create_task(follower.run())
            await asyncio.wait_for(follower.ready.wait(), 20)
            # Ready means the start-up read is indexed (and so in the documents hash).
            assert await redis.hlen(hv.documents_key(a)) == 20
        finally:
            stop.set()
            await cancel_quietly(trickling, following)
