"""An agent's message, like a customer's, is acked before Redis records it (2a9f8d9); a retry in
the same process meanwhile gets the first ack (duplicate=true), not UNAVAILABLE. Before that
commit it got the ack (the settle came first); after it, agent retries were told to retry while
customer retries were answered from memory (real Kafka and Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis
from switchboard.v1 import chat_pb2_grpc, events_pb2

from schemas import hotview as hv
from schemas.events import new_event
from services.ingress._hotview import HeldClaim, IngressHotView
from services.ingress._producer import Ack, EventProducer
from services.ingress._writes import ConversationWrites
from tests.integration.conftest import System
from tests.integration.test_ingress_guarantees import start
from tests.integration.test_ingress_review import stub_read

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
async def test_an_agent_message_retried_before_its_settle_gets_the_first_ack(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    s = system.settings
    target = await start(stub, tenant)
    redis = aioredis.Redis.from_url(s.redis_url)
    producer = EventProducer(s)
    await producer.start()
    hot = IngressHotView(redis, s.idempotency_ttl_s)
    writes = ConversationWrites(s, producer, hot, stub_read)
    release = asyncio.Event()
    real_settle = hot.settle_many

    async def settle_many(outcomes: Sequence[tuple[HeldClaim, Ack | None]], **kw: Any) -> None:
        await release.wait()  # Redis slow to record the ack
        await real_settle(outcomes, **kw)

    hot.settle_many = settle_many  # type: ignore[method-assign]

    def reply() -> events_pb2.Event:
        return new_event(
            tenant,
            target,
            agent_message_sent=events_pb2.AgentMessageSent(
                agent_id="alice", client_message_id="a1", text="hi"
            ),
        )

    key = (tenant, target, hv.agent_claim("a1"))
    try:
        first, duplicate = await asyncio.wait_for(writes.publish_claimed(reply(), key), 15)
        assert not duplicate
        again, duplicate = await writes.publish_claimed(reply(), key)
        assert duplicate and (again.event_id, again.offset) == (first.event_id, first.offset)
    finally:
        release.set()
        await writes.drain(5)
        await producer.stop()
        await redis.aclose()
