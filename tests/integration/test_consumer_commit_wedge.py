"""A processor whose Kafka commit never completes starts its consumer again.

Seen in this session's soak (cycle 26, Kafka killed three times in 30 s) and, unexplained, in
earlier CI runs (a shared-system processor that applied nothing for 90-120 s): the projector's
task dump showed its batch's commit waiting on aiokafka's coordinator lookup lock, held by a
lookup whose request to the killed broker was never answered. Kafka was back 2 s later; the
projector projected nothing for two minutes, until the test gave up: the commit had no bound (by
design it retried for as long as Kafka was down). Now a commit that has not completed within
COMMIT_BOUND_S restarts the consumer; the uncommitted batch is applied again (processors are
idempotent). Here the wedge is the commit never answering, as aiokafka's did.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.settings import Settings
from streams import _consumer
from tests.integration.conftest import eventually
from tests.integration.consumer_rig import Collect, fresh_topic, running_consumer, send_all, started_producer

pytestmark = pytest.mark.integration


@pytest.mark.timeout(180)
async def test_a_commit_that_never_completes_restarts_the_consumer(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_consumer, "COMMIT_BOUND_S", 2.0)
    settings = await fresh_topic(local_stack, "commitwedge")
    async with (
        started_producer(settings) as producer,
        running_consumer(settings, Collect(), "commitwedge") as rig,
    ):
        before = [f"before-{i}".encode() for i in range(10)]
        await send_all(producer, settings.conversation_topic, before)
        await eventually(rig.applied, lambda v: v == before, within_s=60, what="records before the wedge")

        # The next commit of this client never completes (a lookup whose answer never comes).
        assert rig.consumer._consumer is not None
        wedged = rig.consumer._consumer
        real_commit = wedged.commit

        async def never(*args: Any, **kwargs: Any) -> None:
            await asyncio.Event().wait()

        wedged.commit = never
        after = [f"after-{i}".encode() for i in range(10)]
        await send_all(producer, settings.conversation_topic, after)
        # Applied (at least once: the batch whose commit wedged is applied again after the
        # restart), and the consumer is a new one that goes on.
        await eventually(
            rig.applied, lambda v: set(after) <= set(v), within_s=60, what="records after the wedge"
        )
        await eventually(
            lambda: asyncio.sleep(0, rig.consumer._consumer),
            lambda c: c is not None and c is not wedged,
            within_s=60,
            what="a new Kafka consumer",
        )
        wedged.commit = real_commit
        more = [f"more-{i}".encode() for i in range(5)]
        await send_all(producer, settings.conversation_topic, more)
        await eventually(
            rig.applied, lambda v: set(more) <= set(v), within_s=60, what="records after the restart"
        )
        assert rig.consumer.stats.restarts >= 1


@pytest.mark.timeout(180)
async def test_a_consumer_whose_metadata_task_ended_is_started_again(local_stack: Settings) -> None:
    # aiokafka's metadata task ending (seen: uvloop's closed-transport RuntimeError after a Kafka
    # kill -9, services/kafka_clients.py) left the consumer's group coordination waiting on a
    # metadata update that never came, with the lock its commits need: the stall watchdog now
    # starts such a consumer again instead of waiting for a commit to run into COMMIT_BOUND_S.
    settings = await fresh_topic(local_stack, "metadatatask")
    async with (
        started_producer(settings) as producer,
        running_consumer(settings, Collect(), "metadatatask") as rig,
    ):
        before = [f"before-{i}".encode() for i in range(5)]
        await send_all(producer, settings.conversation_topic, before)
        await eventually(rig.applied, lambda v: v == before, within_s=60, what="records before")
        ended = rig.consumer._consumer
        assert ended is not None and ended._client._sync_task is not None
        ended._client._sync_task.cancel()
        await eventually(
            lambda: asyncio.sleep(0, rig.consumer._consumer),
            lambda c: c is not None and c is not ended,
            within_s=30,
            what="a new Kafka consumer",
        )
        assert rig.consumer.stats.restarts == 1
        after = [f"after-{i}".encode() for i in range(5)]
        await send_all(producer, settings.conversation_topic, after)
        await eventually(rig.applied, lambda v: v[-5:] == after, within_s=60, what="records after")
