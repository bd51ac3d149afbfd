"""A read failure does not lose the documents the knowledge indexer had in hand.

Found by review: `run()` cancels its indexer task when the read fails, and `follow()` reads on
from where the reader had read up to. A turn in hand at that moment (taken out of the queue,
embedding in the model thread or writing the documents hash) was dropped: those documents were
never written to the documents hash (never listed, GetDocument NOT_FOUND) and, read before the
failure, never read again; one of the start-up read left `ready` unset for good (the assistant
never answered). Real Kafka and Redis; the failure is the Kafka client's own error.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from switchboard.v1 import knowledge_pb2

from schemas import hotview as hv
from services.ingress._knowledge import record_key, upserted
from services.settings import Settings
from streams.assistant import _worker
from streams.assistant._worker import KnowledgeFollower
from streams.knowledge import KnowledgeBase
from streams.knowledge._index import Document
from tests.conftest import eventually
from tests.integration.knowledge_rig import cancel_quietly, knowledge_topic

pytestmark = pytest.mark.integration


class FailingPoll(AIOKafkaConsumer):
    fail_poll = False

    async def getmany(self, *partitions: Any, **kwargs: Any) -> Any:
        if FailingPoll.fail_poll:
            FailingPoll.fail_poll = False
            raise KafkaError("fetch failed")
        return await super().getmany(*partitions, **kwargs)


class HeldKnowledge(KnowledgeBase):
    """Its upserts wait (in the model thread) while `hold` is clear."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = threading.Event()
        self.hold.set()
        self.upserting = threading.Event()

    def upsert(self, tenant_id: str, documents: Iterable[Document]) -> int:
        self.upserting.set()
        self.hold.wait(60)
        return super().upsert(tenant_id, documents)


@pytest.mark.timeout(180)
async def test_a_read_failure_during_a_turn_does_not_lose_its_documents(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_worker, "AIOKafkaConsumer", FailingPoll)
    monkeypatch.setattr(_worker, "KNOWLEDGE_RETRY_INITIAL_S", 0.05)
    tenant = f"kt{uuid.uuid4().hex[:6]}"
    knowledge = HeldKnowledge()
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

        async def listed() -> set[str]:
            keys = await redis.hkeys(hv.documents_key(tenant))
            return {k.decode() if isinstance(k, bytes) else k for k in keys}

        try:
            task = asyncio.create_task(follower.follow())
            await asyncio.wait_for(follower.ready.wait(), 60)
            knowledge.hold.clear()
            knowledge.upserting.clear()
            await upsert(0)
            await asyncio.to_thread(knowledge.upserting.wait, 60)  # d-0's turn is in hand
            FailingPoll.fail_poll = True
            await eventually(
                lambda: asyncio.sleep(0, FailingPoll.fail_poll), lambda f: not f, what="the poll failed"
            )
            knowledge.hold.set()
            await upsert(1)
            await eventually(
                listed, lambda keys: keys == {"d-0", "d-1"}, within_s=30, what="both documents listed"
            )
            assert follower.applied == 2  # d-0 was not read again: its turn was given back
            assert not task.done()
        finally:
            knowledge.hold.set()
            await cancel_quietly(task)
