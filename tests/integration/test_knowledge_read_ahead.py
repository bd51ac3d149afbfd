"""The knowledge follower holds a bounded number of documents read and not indexed (real Kafka and
Redis): at start-up it read the whole knowledge-events topic into its queue ahead of the indexer,
so memory grew with every tenant's documents before the first was embedded."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterable

import pytest
from switchboard.v1 import knowledge_pb2

from schemas import hotview as hv
from services.ingress._knowledge import record_key, upserted
from services.settings import Settings
from streams.assistant._worker import KnowledgeFollower
from streams.knowledge import Document, KnowledgeBase
from tests.conftest import eventually
from tests.integration.knowledge_rig import cancel_quietly, knowledge_topic

pytestmark = pytest.mark.integration

BACKLOG = 300
BOUND = 20


class GatedKnowledgeBase(KnowledgeBase):
    """The first turn's embedding does not finish until the test opens the gate: meanwhile the
    reader reads as far as the follower lets it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def upsert(self, tenant_id: str, documents: Iterable[Document]) -> int:
        if not self.gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        return super().upsert(tenant_id, documents)


@pytest.mark.timeout(180)
async def test_the_follower_stops_reading_ahead_at_its_bound_and_still_indexes_everything(
    local_stack: Settings,
) -> None:
    tenants = [f"ra{uuid.uuid4().hex[:6]}", f"rb{uuid.uuid4().hex[:6]}"]
    knowledge = GatedKnowledgeBase()
    task = None
    async with knowledge_topic(local_stack) as (settings, producer, redis):
        follower = KnowledgeFollower(settings, knowledge, redis, read_ahead_documents=BOUND)
        try:
            sent = []
            for i in range(BACKLOG):
                tenant = tenants[i % 2]
                doc = knowledge_pb2.Document(
                    document_id=f"d-{i}", title=f"Article {i}", body=f"Parcel {i} ships."
                )
                sent.append(
                    await producer.send(
                        settings.knowledge_topic,
                        key=record_key(tenant, doc.document_id),
                        value=upserted(tenant, doc).SerializeToString(),
                    )
                )
            await asyncio.gather(*sent)
            task = asyncio.create_task(follower.run())

            async def reading() -> tuple[int, bool]:
                return follower.applied, getattr(follower, "waiting_for_room", False)

            # Embedding is stuck: the reader either read the whole backlog or stopped at its bound.
            await eventually(
                reading, lambda s: s[0] == BACKLOG or s[1], within_s=60, what="the reader read all or stopped"
            )
            assert follower.queued <= BOUND, f"{follower.queued} documents held in memory, bound {BOUND}"
            assert follower.applied < BACKLOG
            knowledge.gate.set()
            await asyncio.wait_for(follower.ready.wait(), 90)
            assert follower.held_most <= BOUND
            for tenant in tenants:
                assert await redis.hlen(hv.documents_key(tenant)) == BACKLOG // 2
                assert len(knowledge.index(tenant)) == BACKLOG // 2
        finally:
            knowledge.gate.set()
            await cancel_quietly(task)
