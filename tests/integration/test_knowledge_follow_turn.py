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
from collections.abc import Iterable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from services.settings import Settings
from streams.knowledge import KnowledgeBase
from streams.knowledge._index import Document
from tests.conftest import eventually
from tests.integration.knowledge_rig import knowledge_follower

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
    knowledge = HeldKnowledge()
    async with knowledge_follower(local_stack, monkeypatch, FailingPoll, knowledge, "kt") as rig:
        try:
            task = rig.start()
            await rig.ready()
            knowledge.hold.clear()
            knowledge.upserting.clear()
            await rig.docs.upsert(0)
            await asyncio.to_thread(knowledge.upserting.wait, 60)  # d-0's turn is in hand
            FailingPoll.fail_poll = True
            await eventually(
                lambda: asyncio.sleep(0, FailingPoll.fail_poll), lambda f: not f, what="the poll failed"
            )
            knowledge.hold.set()
            await rig.docs.upsert(1)
            await eventually(
                rig.docs.listed,
                lambda keys: keys == {"d-0", "d-1"},
                within_s=30,
                what="both documents listed",
            )
            assert rig.follower.applied == 2  # d-0 was not read again: its turn was given back
            assert not task.done()
        finally:
            knowledge.hold.set()
