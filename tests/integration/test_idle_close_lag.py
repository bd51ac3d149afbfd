"""The idle close judges a conversation by its folded state, which is only as current as the
sessions worker: while the worker lags (stopped, restarting, catching up after an outage), a
conversation whose customer wrote a moment ago still looks idle in it. The sweeper must not close
such a conversation (real Kafka and Redis; the sessions worker is stopped for the test).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from schemas import hotview as hv
from services.ingress._hotview import IngressHotView
from services.ingress._idle import IdleSweeper
from services.ingress._producer import EventProducer
from services.ingress._writes import ConversationWrites
from tests.conftest import System, eventually
from tests.integration.test_ingress_guarantees import message, start
from tests.integration.test_ingress_review import stub_read

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
async def test_a_conversation_active_after_the_folded_state_is_not_closed_while_the_worker_lags(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    s = system.settings
    redis = aioredis.Redis.from_url(s.redis_url)
    producer = EventProducer(s)
    await producer.start()
    writes = ConversationWrites(s, producer, IngressHotView(redis, s.idempotency_ttl_s), stub_read)
    sweeper = IdleSweeper(s, redis, writes)
    sessions = system.children["sessions"]
    try:
        target = await start(stub, tenant)
        assert (await stub.SendMessage(message(tenant, target, "m1"))).offset >= 0
        await eventually(
            lambda: redis.hget(hv.conversation_key(tenant, target), hv.F_STATE),
            lambda raw: raw is not None and b'"message_count": 1' in raw,
            within_s=30,
            what="m1 folded",
        )
        sessions.stop()
        # The customer is quiet for 3 s, then writes again: acknowledged (in Kafka), not folded.
        await asyncio.sleep(3)
        (m2,) = await writes.accept_messages([message(tenant, target, "m2")])
        assert isinstance(m2, chat_pb2.SendMessageResponse), m2
        # Idle for 2 s by the folded state (m1), active 0 s ago in truth (m2): not idle.
        closed = await sweeper.sweep_tenant(tenant, 2.0)
        assert closed == 0, "closed a conversation whose customer wrote a moment ago"
        conv = await stub.GetConversation(
            chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=target)
        )
        assert conv.status == chat_pb2.CONVERSATION_STATUS_OPEN
    finally:
        await system.start_children("sessions")
        await producer.stop()
        await redis.aclose()
    # Once the worker caught up (m2 folded), the conversation is judged by m2, and closed once it
    # is idle in truth.
    await eventually(
        lambda: redis_state(s.redis_url, tenant, target),
        lambda raw: raw is not None and b'"message_count": 2' in raw,
        within_s=60,
        what="m2 folded after the restart",
    )
    redis = aioredis.Redis.from_url(s.redis_url)
    producer = EventProducer(s)
    await producer.start()
    try:
        writes = ConversationWrites(s, producer, IngressHotView(redis, s.idempotency_ttl_s), stub_read)
        sweeper = IdleSweeper(s, redis, writes)

        async def sweep() -> int:
            return await sweeper.sweep_tenant(tenant, 2.0)

        assert await eventually(sweep, lambda n: n == 1, within_s=30, what="the idle close") == 1
        (late,) = await writes.accept_messages([message(tenant, target, "late")])
        assert getattr(late, "code", None) is grpc.StatusCode.FAILED_PRECONDITION, late
    finally:
        await producer.stop()
        await redis.aclose()


async def redis_state(url: str, tenant: str, cid: str) -> bytes | None:
    redis = aioredis.Redis.from_url(url)
    try:
        raw: bytes | None = await redis.hget(hv.conversation_key(tenant, cid), hv.F_STATE)  # type: ignore[assignment]
        return raw
    finally:
        await redis.aclose()
