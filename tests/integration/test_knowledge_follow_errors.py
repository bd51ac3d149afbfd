"""The assistant's knowledge follower reads on after a failure, where it had read up to.

It ran as one task: a failure (Kafka away when the assistant started, a fetch error later) ended
it for good. At start-up that left `ready` unset, so the assistant never answered; later, no
document upserted afterwards was ever indexed. Real Kafka and Redis; the failures are the Kafka
client's own errors, raised where aiokafka raises them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError, KafkaError

from services.settings import Settings
from streams.knowledge import KnowledgeBase
from tests.conftest import eventually
from tests.integration.knowledge_rig import knowledge_follower

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
    async with knowledge_follower(local_stack, monkeypatch, FlakyConsumer, KnowledgeBase(), "kf") as rig:
        for i in range(3):
            await rig.docs.upsert(i)
        task = rig.start()
        # The first start failed (Kafka away): the follower still becomes ready.
        await rig.ready()
        assert FlakyConsumer.starts >= 2
        assert await rig.docs.indexed() == 3

        FlakyConsumer.fail_poll = True
        await eventually(
            lambda: asyncio.sleep(0, FlakyConsumer.fail_poll), lambda f: not f, what="the poll failed"
        )
        for i in range(3, 6):
            await rig.docs.upsert(i)
        await eventually(
            rig.docs.indexed, lambda n: n == 6, within_s=60, what="documents upserted after the failure"
        )
        # Resumed where it had read up to: nothing read twice.
        assert rig.follower.applied == 6
        assert not task.done()
