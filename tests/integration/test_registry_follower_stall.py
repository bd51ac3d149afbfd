"""The ingress's tenants-topic follower survives a Kafka client that stopped fetching
(aio-libs/aiokafka#983).

aiokafka fetches in a background task; when it ends (it swallows a cancellation and finishes
without a word), `getmany` returns nothing forever. The follower then looked alive and never
learned of another key or revocation: a revoked key went on working on that ingress until it was
restarted; when it ended during the read to the topic's end, that read never finished. Here the
fetch task is ended the way that issue describes, on real Kafka.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer

from services.auth import _log
from services.auth._log import RegistryFollower, append_records
from services.auth._model import Status, TenantRecord
from services.kafka_topics import ensure_topics
from services.settings import Settings
from tests.conftest import eventually
from tests.integration.test_erasure_follower_stall import end_fetch_task

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
async def test_a_follower_whose_client_stopped_fetching_still_learns_of_changes(
    local_stack: Settings,
) -> None:
    settings = local_stack.model_copy(update={"tenants_topic": f"tenants-{uuid.uuid4().hex[:8]}"})
    await ensure_topics(settings)
    await append_records(settings, [TenantRecord("before", created_at=1.0)])
    follower = RegistryFollower(settings)
    try:
        registry = await follower.start()
        assert "before" in registry.tenants
        assert follower._consumer is not None
        await end_fetch_task(follower._consumer)
        await append_records(
            settings,
            [TenantRecord("later", created_at=2.0), TenantRecord("before", Status.DISABLED, 1.0, 3.0)],
        )

        async def learned() -> tuple[bool, Status | None]:
            before = follower.registry.tenants.get("before")
            return "later" in follower.registry.tenants, before.status if before else None

        await eventually(
            learned, lambda v: v == (True, Status.DISABLED), within_s=30, what="the records after the fault"
        )
    finally:
        await follower.stop()


class FirstConsumerStopsFetching(AIOKafkaConsumer):
    """The first consumer made stops fetching as soon as it has started."""

    made = 0

    async def start(self) -> None:
        FirstConsumerStopsFetching.made += 1
        await super().start()
        if FirstConsumerStopsFetching.made == 1:
            await end_fetch_task(self)


@pytest.mark.timeout(120)
async def test_the_read_to_the_end_is_begun_again_when_the_client_stopped_fetching(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ingress reads the topic to its end before it serves, and the archiver's retention loop
    # before each round: a read that never ends held either up for good.
    settings = local_stack.model_copy(update={"tenants_topic": f"tenants-{uuid.uuid4().hex[:8]}"})
    await ensure_topics(settings)
    await append_records(settings, [TenantRecord(f"t{i}", created_at=1.0) for i in range(5)])
    FirstConsumerStopsFetching.made = 0
    monkeypatch.setattr(_log, "AIOKafkaConsumer", FirstConsumerStopsFetching)
    monkeypatch.setattr(_log, "CATCH_UP_BOUND_S", 3.0)
    follower = RegistryFollower(settings)
    try:
        # Within the bound and a new consumer's read (was 43 s: the seek outside the bound waited
        # the stalled consumer's whole 40 s request timeout).
        registry = await asyncio.wait_for(follower.start(), 20)
        assert sorted(registry.tenants) == [f"t{i}" for i in range(5)]
        assert FirstConsumerStopsFetching.made == 2
    finally:
        await follower.stop()
