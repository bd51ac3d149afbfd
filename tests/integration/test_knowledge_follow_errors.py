"""The assistant's knowledge follower reads on after a failure, where it had read up to.

It ran as one task: a failure (Kafka away when the assistant started, a fetch error later) ended
it for good. At start-up that left `ready` unset, so the assistant never answered; later, no
document upserted afterwards was ever indexed. Real Kafka and Redis; the failures are the Kafka
client's own errors, raised where aiokafka raises them.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError, KafkaError
from switchboard.v1 import knowledge_pb2

from schemas import hotview as hv
from services.ingress._knowledge import record_key, upserted
from services.settings import Settings
from streams.assistant import _worker
from streams.assistant._worker import KnowledgeFollower
from streams.knowledge import KnowledgeBase
from tests.conftest import eventually
from tests.integration.knowledge_rig import cancel_quietly, knowledge_topic

pytestmark = pytest.mark.integration


class FlakyConsumer(AIOKafkaConsumer):
    """The first start fails as with Kafka away; a poll fails once when `fail_poll` is set."""

    starts = 0
    fail_poll = False

    async def start(self) -> None:
        FlakyConsumer.starts += 1
        if FlakyConsumer.starts == 1:
            raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9092)]")
        await super().start()

    async def getmany(self, *partitions: Any, **kwargs: Any) -> Any:
        if FlakyConsumer.fail_poll:
            FlakyConsumer.fail_poll = False
            raise KafkaError("fetch failed")
        return await super().getmany(*partitions, **kwargs)


@pytest.mark.timeout(180)
async def test_the_follower_reads_on_after_a_failure_where_it_had_read_up_to(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_worker, "AIOKafkaConsumer", FlakyConsumer)
    monkeypatch.setattr(_worker, "KNOWLEDGE_RETRY_INITIAL_S", 0.05)
    tenant = f"kf{uuid.uuid4().hex[:6]}"
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
            for i in range(3):
                await upsert(i)
            task = asyncio.create_task(follower.follow())
            # The first start failed (Kafka away): the follower still becomes ready.
            await asyncio.wait_for(follower.ready.wait(), 60)
            assert FlakyConsumer.starts >= 2
            assert await indexed() == 3

            FlakyConsumer.fail_poll = True
            await eventually(
                lambda: asyncio.sleep(0, FlakyConsumer.fail_poll), lambda f: not f, what="the poll failed"
            )
            for i in range(3, 6):
                await upsert(i)
            await eventually(
                indexed, lambda n: n == 6, within_s=60, what="documents upserted after the failure"
            )
            # Resumed where it had read up to: nothing read twice.
            assert follower.applied == 6
            assert not task.done()
        finally:
            await cancel_quietly(task)
