"""A message's ack does not wait for Redis to record it (issue 7: one round trip less per ack),
and a retry is never answered wrongly meanwhile, on real Kafka and Redis.

The ack is durable once Kafka has the event; recording it in Redis (the settle) is what lets a
later retry get the first ack. While that record is on its way, a retry in the same process is
answered from memory (duplicate=true, the first ack), a retry in another process finds the claim
pending and is told to retry shortly, and once Redis has it every process answers duplicate=true.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from schemas import hotview as hv
from services.ingress import _validation as v
from services.ingress._hotview import HeldClaim, IngressHotView
from services.ingress._producer import Ack, EventProducer
from services.ingress._writes import ConversationWrites
from tests.integration.conftest import System, eventually
from tests.integration.test_ingress_guarantees import message, start
from tests.integration.test_ingress_review import stub_read

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
async def test_an_ack_does_not_wait_for_its_settle_and_retries_meanwhile_are_answered_right(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    s = system.settings
    target = await start(stub, tenant)
    redis = aioredis.Redis.from_url(s.redis_url)
    producers = [EventProducer(s), EventProducer(s)]
    for p in producers:
        await p.start()
    hot_a = IngressHotView(redis, s.idempotency_ttl_s)
    a = ConversationWrites(s, producers[0], hot_a, stub_read)
    b = ConversationWrites(s, producers[1], IngressHotView(redis, s.idempotency_ttl_s), stub_read)
    # Process A's settles are held back, as when Redis is slow to take them.
    release = asyncio.Event()
    real_settle = hot_a.settle_many

    async def settle_many(outcomes: Sequence[tuple[HeldClaim, Ack | None]], **kw: Any) -> None:
        await release.wait()
        await real_settle(outcomes, **kw)

    hot_a.settle_many = settle_many  # type: ignore[method-assign]
    # The sessions worker records a claim too, when it folds the event (what recovers an ack
    # whose settle was lost to a kill -9); stopped, it cannot settle the held-back claim before
    # the test looks (fresh-clone CI: "settled although held back", the worker had folded it).
    system.children["sessions"].stop()
    try:
        # Before: the ack waited for the settle, so this never returned while it was held.
        (sent,) = await asyncio.wait_for(a.accept_messages([message(tenant, target, "m")]), 15)
        assert isinstance(sent, chat_pb2.SendMessageResponse) and not sent.duplicate, sent
        key = hv.idempotency_key(tenant, target, "m")
        held: bytes = await redis.get(key) or b""  # type: ignore[assignment]
        assert held.startswith(hv.CLAIM_PENDING), "settled although held back"

        # A retry in the same process: the first ack, from memory.
        (again,) = await a.accept_messages([message(tenant, target, "m")])
        assert isinstance(again, chat_pb2.SendMessageResponse) and again.duplicate, again
        assert (again.event_id, again.offset) == (sent.event_id, sent.offset)
        # A retry in another process: pending, so "retry shortly" (never a second write).
        (elsewhere,) = await b.accept_messages([message(tenant, target, "m")])
        assert isinstance(elsewhere, v.RequestRejected), elsewhere
        assert elsewhere.code == grpc.StatusCode.UNAVAILABLE and "retry shortly" in elsewhere.message

        release.set()
        await eventually(
            lambda: redis.get(key),
            lambda raw: isinstance(raw, bytes) and not raw.startswith(hv.CLAIM_PENDING),
            within_s=10,
            what="the settle recorded in Redis",
        )
        (later,) = await b.accept_messages([message(tenant, target, "m")])
        assert isinstance(later, chat_pb2.SendMessageResponse) and later.duplicate, later
        assert (later.event_id, later.offset) == (sent.event_id, sent.offset)
        await eventually(
            lambda: redis.exists(hv.inflight_key(tenant, target)),
            lambda n: n == 0,
            within_s=10,
            what="the in-flight set emptied by the settle",
        )
        state = await stub.GetConversation(
            chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=target)
        )
        assert state.message_count <= 1  # one write only, whatever the worker has applied yet
    finally:
        release.set()
        await a.drain(5)
        for p in producers:
            await p.stop()
        await redis.aclose()
        await system.start_children("sessions")
