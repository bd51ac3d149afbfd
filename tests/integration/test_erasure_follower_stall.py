"""The erasure follower survives a Kafka client that stopped fetching (aio-libs/aiokafka#983).

aiokafka fetches in a background task; when it ends (it swallows a cancellation and finishes
without a word), `getmany` returns nothing forever and `position()` of a partition being reset
never returns. The follower's read to the topic's end would then never finish (every processor
batch refused as an outage: nothing projected, nothing folded), or, once caught up, it would stop
learning of erasures. Here the fetch task is ended the way that issue describes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer

from services.settings import Settings
from streams.privacy import erasures
from streams.privacy._erase import erasure_event
from streams.privacy.erasures import ErasureFollower, publish_erasure
from tests.integration.conftest import eventually

pytestmark = pytest.mark.integration


async def end_fetch_task(consumer: AIOKafkaConsumer) -> None:
    task = consumer._fetcher._fetch_task
    for _ in range(20):  # let it reach an await (cancelled before its first step, it would not swallow it)
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.done() and not task.cancelled()  # it swallowed the cancellation


class FirstConsumerStopsFetching(ErasureFollower):
    """The first consumer it makes stops fetching as soon as it has started."""

    made = 0

    def _new_consumer(self) -> AIOKafkaConsumer:
        consumer = super()._new_consumer()
        self.made += 1
        if self.made == 1:
            start = consumer.start

            async def start_then_stop_fetching() -> None:
                await start()
                await end_fetch_task(consumer)

            consumer.start = start_then_stop_fetching
        return consumer


@pytest.mark.timeout(180)
async def test_the_read_to_the_end_is_begun_again_when_the_client_stopped_fetching(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(erasures, "CATCH_UP_BOUND_S", 2.0)
    tenant = f"t{uuid.uuid4().hex[:10]}"
    await publish_erasure(local_stack, erasure_event(tenant, "cust", ["gone"], "test", time.time_ns()))
    follower = FirstConsumerStopsFetching(local_stack, start_timeout_s=60)
    try:
        registry = await follower.start()
        assert registry.conversation_erased(tenant, "gone")
        assert follower.made == 2
    finally:
        await follower.stop()


@pytest.mark.timeout(180)
async def test_a_follower_whose_client_stopped_fetching_still_learns_of_erasures(
    local_stack: Settings,
) -> None:
    tenant = f"t{uuid.uuid4().hex[:10]}"
    follower = ErasureFollower(local_stack, start_timeout_s=60)
    try:
        await follower.start()
        assert follower._consumer is not None
        await end_fetch_task(follower._consumer)
        await publish_erasure(local_stack, erasure_event(tenant, "cust", ["later"], "test", time.time_ns()))

        async def erased() -> bool:
            return follower.erasures.conversation_erased(tenant, "later")

        await eventually(erased, bool, within_s=30, what="the erasure published after the fault")
    finally:
        await follower.stop()
