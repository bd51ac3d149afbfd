"""The assistant's knowledge follower survives a Kafka client that stopped fetching
(aio-libs/aiokafka#983).

aiokafka fetches in a background task; when it ends (it swallows a cancellation and finishes
without a word), `getmany` returns nothing forever and raises nothing, so `follow()`'s retry never
ran: the follower looked alive and no document upserted afterwards was ever indexed. Real Kafka
and Redis; the fetch task is ended the way that issue describes.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
from aiokafka import AIOKafkaConsumer

from services.settings import Settings
from streams.knowledge import KnowledgeBase
from tests.conftest import eventually
from tests.integration.knowledge_rig import knowledge_follower
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
    async with knowledge_follower(local_stack, monkeypatch, RecordedConsumer, KnowledgeBase(), "ks") as rig:
        for i in range(2):
            await rig.docs.upsert(i)
        task = rig.start()
        await rig.ready()
        assert await rig.docs.indexed() == 2
        await end_fetch_task(RecordedConsumer.made[-1])
        for i in range(2, 5):
            await rig.docs.upsert(i)
        await eventually(
            rig.docs.indexed, lambda n: n == 5, within_s=30, what="documents upserted after the fault"
        )
        # Read on where it had read up to: nothing read twice.
        assert rig.follower.applied == 5
        assert not task.done()
