"""A start or a close claimed by an ingress process that died mid-write is taken over by its
retry within a lease, not after the claim's 120 s expiry; and a dead close's hold stops refusing
the conversation's sends as soon as the log says the close did not land.

What was seen (eighth session's closing note): after a kill -9 of an ingress process (or of
`switchboard run`) between a StartConversation's or CloseConversation's claim and its ack, the
retry was refused "is being started/closed by an earlier attempt" for 120 s (CLAIM_TTL_S), and
every SendMessage of a conversation whose close was under way was refused "is being closed" for
as long: the hold outlived its process. Messages were taken over within the lease already.

Each test claims as a dead process would (its own lease, ended as its supervisor ends it when it
sees the process exit) and, where the dead attempt's record did land, writes that record to Kafka
itself: the retry must then be answered what the log holds, never a second start or an ack after
the close.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable

import grpc
import pytest
import redis.asyncio as aioredis
from switchboard.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from schemas import hotview as hv
from schemas.events import new_event
from services.ingress._hotview import LEASE_S, IngressHotView, end_lease, new_lease_id
from services.processes import wait_for_ingress
from services.settings import Settings
from tests.conftest import count, eventually, start_conversation, wait_for_count
from tests.integration.conftest import System
from tests.integration.test_erase import produce

pytestmark = pytest.mark.integration

_STARTS = (
    "SELECT count() FROM switchboard.events FINAL WHERE tenant_id = {t:String} "
    "AND conversation_id = {c:String} AND type = 'conversation_started'"
)
_MESSAGES = (
    "SELECT count() FROM switchboard.events FINAL WHERE tenant_id = {t:String} "
    "AND conversation_id = {c:String} AND type = 'message_received'"
)


class _DeadProcess:
    """The hot view of an ingress process that claims and then dies: its lease ends (as
    `switchboard ingress` ends a dead child's) once `die` is called."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self.lease_id = new_lease_id()
        self.hot = IngressHotView(redis, 3600, lease_id=self.lease_id)

    async def __aenter__(self) -> _DeadProcess:
        await self.hot.renew_lease()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.die()

    async def die(self) -> None:
        await end_lease(self._redis, self.lease_id)


async def _unary(call: Awaitable[object]) -> object:
    """The response, or the AioRpcError (asserted by the caller)."""
    try:
        return await call
    except grpc.aio.AioRpcError as err:
        return err


def _start_request(tenant: str, conversation_id: str) -> chat_pb2.StartConversationRequest:
    return chat_pb2.StartConversationRequest(
        tenant_id=tenant, conversation_id=conversation_id, channel=events_pb2.CHANNEL_WEB, customer_id="c"
    )


@pytest.fixture
async def redis(system: System) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(system.settings.redis_url)
    yield client
    await client.aclose()


@pytest.mark.parametrize("landed", [False, True], ids=["not-landed", "landed"])
@pytest.mark.timeout(120)
async def test_the_retried_start_of_a_dead_process_is_answered_at_once(
    system: System, tenant: str, stub: chat_pb2_grpc.ChatServiceStub, redis: aioredis.Redis, landed: bool
) -> None:
    settings = system.settings
    await wait_for_ingress(settings)
    await start_conversation(stub, tenant, channel=events_pb2.CHANNEL_WEB, customer_id="c")  # metadata
    conversation_id = f"dead-start-{uuid.uuid4().hex[:8]}"
    earlier = new_event(
        tenant,
        conversation_id,
        conversation_started=events_pb2.ConversationStarted(channel=events_pb2.CHANNEL_WEB, customer_id="c"),
    )
    async with _DeadProcess(redis) as dead:
        (claim,) = await dead.hot.claim_many(
            [(tenant, conversation_id, hv.START_CLAIM)], settings.topic_partitions
        )
        assert claim.claimed
        if landed:
            await produce(settings, [earlier])
    died = time.monotonic()

    def probe() -> Awaitable[object]:
        return _unary(stub.StartConversation(_start_request(tenant, conversation_id), timeout=10))

    started = await eventually(
        probe, lambda r: isinstance(r, chat_pb2.Conversation), within_s=LEASE_S + 30, what="the start"
    )
    took = time.monotonic() - died
    assert isinstance(started, chat_pb2.Conversation)
    assert started.conversation_id == conversation_id
    assert took < LEASE_S / 2, f"started {took:.1f}s after the process died"
    if landed:
        # The dead attempt's start is the conversation's: not a second one.
        assert started.created_at == earlier.occurred_at
    # Its messages are taken, and the log holds one start (a message later in the same partition
    # is projected after it).
    ack = await stub.SendMessage(
        chat_pb2.SendMessageRequest(
            tenant_id=tenant, conversation_id=conversation_id, client_message_id="m1", text="hello"
        ),
        timeout=10,
    )
    assert not ack.duplicate
    await wait_for_count(system, _MESSAGES, 1, what="the message projected", t=tenant, c=conversation_id)
    assert count(system, _STARTS, t=tenant, c=conversation_id) == 1
    print(f"\nretried start answered {took:.2f}s after its process died (landed={landed})")


async def _held_by_a_dead_close(
    settings: Settings, redis: aioredis.Redis, tenant: str, conversation_id: str, *, landed: bool
) -> float:
    """A dead process claims the close, holds the conversation (as CloseConversation does before
    it writes) and dies; with `landed` its close is in the log. Returns when it died."""
    async with _DeadProcess(redis) as dead:
        key = (tenant, conversation_id, hv.CLOSE_CLAIM)
        (claim,) = await dead.hot.claim_many([key], settings.topic_partitions)
        assert claim.claimed
        assert await dead.hot.hold_for_close(tenant, conversation_id, claim.marker) == 0
        if landed:
            await produce(
                settings,
                [
                    new_event(
                        tenant,
                        conversation_id,
                        conversation_closed=events_pb2.ConversationClosed(
                            resolution="dead", closed_by=events_pb2.SENDER_CUSTOMER
                        ),
                    )
                ],
            )
    return time.monotonic()


@pytest.mark.timeout(120)
async def test_a_dead_close_that_did_not_land_stops_holding_the_conversation(
    system: System, tenant: str, stub: chat_pb2_grpc.ChatServiceStub, redis: aioredis.Redis
) -> None:
    settings = system.settings
    await wait_for_ingress(settings)
    conversation_id = await start_conversation(stub, tenant, channel=events_pb2.CHANNEL_WEB, customer_id="c")
    died = await _held_by_a_dead_close(settings, redis, tenant, conversation_id, landed=False)

    def send(cmid: str) -> Awaitable[object]:
        return _unary(
            stub.SendMessage(
                chat_pb2.SendMessageRequest(
                    tenant_id=tenant,
                    conversation_id=conversation_id,
                    client_message_id=cmid,
                    text="still here",
                ),
                timeout=10,
            )
        )

    refusals: list[str] = []

    def refused(r: object) -> bool:
        if isinstance(r, grpc.aio.AioRpcError):
            assert r.code() == grpc.StatusCode.UNAVAILABLE, r
            refusals.append(r.details() or "")
            return False
        return True

    ack = await eventually(lambda: send("after-dead-close"), refused, within_s=LEASE_S + 30, what="the send")
    took = time.monotonic() - died
    assert isinstance(ack, chat_pb2.SendMessageResponse) and not ack.duplicate
    assert took < LEASE_S / 2, f"the send was refused for {took:.1f}s: {refusals[:3]}"
    # The close's retry takes the dead attempt's claim over and closes after that message.
    closed = await stub.CloseConversation(
        chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=conversation_id), timeout=30
    )
    assert closed.status == chat_pb2.CONVERSATION_STATUS_CLOSED
    assert [m.text for m in closed.messages if m.sender == events_pb2.SENDER_CUSTOMER] == ["still here"]
    late = await send("after-the-real-close")
    assert isinstance(late, grpc.aio.AioRpcError) and late.code() == grpc.StatusCode.FAILED_PRECONDITION
    print(f"\nsend acked {took:.2f}s after the closing process died ({len(refusals)} refusals)")


@pytest.mark.timeout(120)
async def test_a_dead_close_that_landed_refuses_sends_as_closed(
    system: System, tenant: str, stub: chat_pb2_grpc.ChatServiceStub, redis: aioredis.Redis
) -> None:
    settings = system.settings
    await wait_for_ingress(settings)
    conversation_id = await start_conversation(stub, tenant, channel=events_pb2.CHANNEL_WEB, customer_id="c")
    await _held_by_a_dead_close(settings, redis, tenant, conversation_id, landed=True)
    # However soon after, a send is never acked behind the landed close: refused while the fold
    # catches up, then refused as closed.
    request = chat_pb2.SendMessageRequest(
        tenant_id=tenant, conversation_id=conversation_id, client_message_id="behind-the-close", text="x"
    )

    def refused_as_closed(r: object) -> bool:
        assert isinstance(r, grpc.aio.AioRpcError), f"acked after a close in the log: {r}"
        assert r.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION), r
        return r.code() == grpc.StatusCode.FAILED_PRECONDITION

    await eventually(
        lambda: _unary(stub.SendMessage(request, timeout=10)),
        refused_as_closed,
        within_s=LEASE_S / 2,
        what="the send refused as closed",
    )
    closed = await stub.CloseConversation(
        chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=conversation_id), timeout=30
    )
    assert closed.status == chat_pb2.CONVERSATION_STATUS_CLOSED
    assert closed.resolution == "dead"
