"""Review findings on the ingress write path, on real Kafka and Redis (each failed before its fix).

- A message claimed before a close of its conversation (in the same process) was written after
  the close, acknowledged, and dropped by the fold.
- While the hot view is incomplete (Redis lost data, the sessions worker rebuilding), a
  conversation it does not have was answered NOT_FOUND — permanent to a client — by every RPC.
- A retried delete of a failed write's claim removed what a later attempt had put there.
- A message claimed in one ingress process while another closed its conversation was written
  after the close, acknowledged, and dropped by the fold.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
import pytest
import redis.asyncio as aioredis
from switchboard.v1 import agent_pb2, agent_pb2_grpc, chat_pb2, chat_pb2_grpc

from schemas import hotview as hv
from schemas.events import Event
from services.ingress import IngressServer
from services.ingress import _validation as v
from services.ingress._hotview import IngressHotView
from services.ingress._producer import Ack, EventProducer
from services.ingress._writes import ConversationWrites, WriteOrder
from tests.integration.conftest import System, eventually
from tests.integration.test_ingress_guarantees import client, ingress, message, start  # noqa: F401

pytestmark = pytest.mark.integration


async def stub_read(tenant_id: str, conversation_id: str) -> chat_pb2.Conversation:
    """What ConversationWrites reads back after a start or a close; these tests look at Redis
    and the log instead."""
    return chat_pb2.Conversation(tenant_id=tenant_id, conversation_id=conversation_id)


@pytest.mark.timeout(180)
async def test_a_message_claimed_before_a_close_is_refused_not_written_after_it(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    s = system.settings
    slow = await start(stub, tenant)
    target = await start(stub, tenant)
    redis = aioredis.Redis.from_url(s.redis_url)
    producer = EventProducer(s)
    await producer.start()
    hot = IngressHotView(redis, s.idempotency_ttl_s)

    writes = ConversationWrites(s, producer, hot, stub_read)
    # The stream's previous batch is slow to hand to the producer (as with a full Kafka buffer).
    release = asyncio.Event()
    real_enqueue = producer.enqueue

    async def enqueue(event: Event, *, bounded: bool = True) -> asyncio.Future[object]:
        if event.conversation_id == slow:
            await release.wait()
        return await real_enqueue(event, bounded=bounded)

    producer.enqueue = enqueue  # type: ignore[method-assign]
    try:
        first = WriteOrder(None)
        b1 = asyncio.ensure_future(writes.accept_messages([message(tenant, slow, "a")], "", first))
        b2 = asyncio.ensure_future(
            writes.accept_messages([message(tenant, target, "b")], "", WriteOrder(first))
        )
        key = hv.idempotency_key(tenant, target, "b")
        await eventually(lambda: redis.exists(key), lambda n: n == 1, within_s=10, what="b claimed")
        await writes.close_conversation(
            chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=target)
        )
        release.set()
        (o1,), (o2,) = await asyncio.gather(b1, b2)
        assert isinstance(o1, chat_pb2.SendMessageResponse)
        # Before the fix: acknowledged at an offset after the close, and lost by the fold.
        assert not isinstance(o2, chat_pb2.SendMessageResponse), o2
        assert o2.code == grpc.StatusCode.FAILED_PRECONDITION, o2
        assert await redis.exists(key) == 0, "the refused message's claim was kept"
        state = await eventually(
            lambda: stub.GetConversation(
                chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=target)
            ),
            lambda c: c.status == chat_pb2.CONVERSATION_STATUS_CLOSED,
            within_s=30,
        )
        assert state.message_count == 0
    finally:
        release.set()
        await producer.stop()
        await redis.aclose()


@pytest.mark.timeout(180)
async def test_a_message_racing_a_close_in_another_process_is_before_the_close_or_refused(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    """`switchboard ingress` runs one process per core: a message claimed in process A while
    process B closes its conversation was acked after the close in the log (and dropped by the
    fold). Two ConversationWrites with producers, gates and registries of their own are two
    processes here; they share only Redis and Kafka, as processes do."""
    s = system.settings
    target = await start(stub, tenant)
    redis = aioredis.Redis.from_url(s.redis_url)
    producers = [EventProducer(s), EventProducer(s)]
    for p in producers:
        await p.start()

    a, b = (
        ConversationWrites(s, p, IngressHotView(redis, s.idempotency_ttl_s), stub_read) for p in producers
    )
    # Process A claimed the message and is slow to hand it to its producer (a full buffer).
    release = asyncio.Event()
    real_enqueue = producers[0].enqueue

    async def enqueue(event: Event, *, bounded: bool = True) -> asyncio.Future[object]:
        if event.HasField("message_received"):
            await release.wait()
        return await real_enqueue(event, bounded=bounded)

    producers[0].enqueue = enqueue  # type: ignore[method-assign]
    try:
        send = asyncio.ensure_future(a.accept_messages([message(tenant, target, "m")]))
        key = hv.idempotency_key(tenant, target, "m")
        await eventually(lambda: redis.exists(key), lambda n: n == 1, within_s=10, what="m claimed in A")
        close = asyncio.ensure_future(
            b.close_conversation(chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=target))
        )
        conv_key = hv.conversation_key(tenant, target)

        async def held_or_closed() -> bool:
            return close.done() or bool(await redis.hexists(conv_key, hv.F_CLOSING))

        await eventually(held_or_closed, bool, within_s=10, what="the close's hold")
        # Before the fix: the close was in the log already, ahead of A's acknowledged message.
        assert not close.done(), "the close did not wait for another process's unsettled message"
        # While the close waits for A's message, no process accepts a new one.
        (late,) = await b.accept_messages([message(tenant, target, "late")])
        assert isinstance(late, v.RequestRejected) and late.code == grpc.StatusCode.UNAVAILABLE, late
        assert "being closed" in late.message
        (late_a,) = await a.accept_messages([message(tenant, target, "late-a")])
        assert isinstance(late_a, v.RequestRejected) and late_a.code == grpc.StatusCode.UNAVAILABLE
        release.set()
        (sent,) = await send
        await close
        assert isinstance(sent, chat_pb2.SendMessageResponse), sent
        # Before the fix: acked, but after the close in the log, so the fold never counted it.
        state = await eventually(
            lambda: stub.GetConversation(
                chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=target)
            ),
            lambda c: c.status == chat_pb2.CONVERSATION_STATUS_CLOSED,
            within_s=30,
        )
        assert state.message_count == 1
        assert [m.client_message_id for m in state.messages] == ["m"]
        # A retry of the acked message after the close still gets its ack.
        (again,) = await b.accept_messages([message(tenant, target, "m")])
        assert isinstance(again, chat_pb2.SendMessageResponse) and again.duplicate, again
        assert again.event_id == sent.event_id
        assert await redis.exists(hv.inflight_key(tenant, target)) == 0
    finally:
        release.set()
        for p in producers:
            await p.stop()
        await redis.aclose()


@pytest.mark.timeout(120)
async def test_a_close_waiting_on_a_dead_process_gives_up_and_lets_sends_go_on(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    """A process that died holding a claim leaves its entry in the in-flight set until it expires:
    the close answers UNAVAILABLE after the produce timeout instead of hanging, and releases its
    hold, so the conversation keeps taking messages until the close is retried."""
    s = system.settings.model_copy(update={"produce_timeout_s": 1.0})
    target = await start(stub, tenant)
    redis = aioredis.Redis.from_url(s.redis_url)
    producer = EventProducer(s)
    await producer.start()

    writes = ConversationWrites(s, producer, IngressHotView(redis, s.idempotency_ttl_s), stub_read)
    inflight = hv.inflight_key(tenant, target)
    try:
        await redis.zadd(inflight, {b"pending:dead-process-marker": 2**50})
        started = time.monotonic()
        with pytest.raises(v.RequestRejected) as refused:
            await writes.close_conversation(
                chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=target)
            )
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert "still being written" in refused.value.message
        assert time.monotonic() - started < 10
        assert not await redis.hexists(hv.conversation_key(tenant, target), hv.F_CLOSING)
        (sent,) = await writes.accept_messages([message(tenant, target, "after")])
        assert isinstance(sent, chat_pb2.SendMessageResponse), sent
        # Once the entry is gone (expired), the retried close goes through.
        await redis.delete(inflight)
        await writes.close_conversation(
            chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=target)
        )
        (closed,) = await writes.accept_messages([message(tenant, target, "too-late")])
        assert isinstance(closed, v.RequestRejected) and closed.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await producer.stop()
        await redis.aclose()


async def _code(call: Callable[[], Awaitable[object]]) -> tuple[grpc.StatusCode | None, str]:
    try:
        result = call()
        if hasattr(result, "__aiter__"):  # a server stream: its first message or its status
            async for _ in result:
                break
            return None, ""
        await result
    except grpc.aio.AioRpcError as err:
        retry_after = dict(err.trailing_metadata() or ()).get("retry-after-ms")
        return err.code(), f"{err.details()} retry-after-ms={retry_after}"
    return None, ""


@pytest.mark.timeout(180)
async def test_an_unknown_conversation_is_unavailable_not_missing_while_the_hot_view_is_rebuilt(
    ingress: IngressServer,  # noqa: F811
    client: chat_pb2_grpc.ChatServiceStub,  # noqa: F811
    tenant: str,
) -> None:
    # A conversation this ingress has not cached and the hot view does not have: after Redis lost
    # data it may well exist (the rebuild has not brought it back yet).
    cid = f"c{uuid.uuid4().hex[:12]}"
    redis = aioredis.Redis.from_url(ingress.settings.redis_url)
    channel = grpc.aio.insecure_channel(ingress.settings.grpc_listen)
    agents = agent_pb2_grpc.AgentServiceStub(channel)

    def calls() -> dict[str, Callable[[], Awaitable[object]]]:
        return {
            "SendMessage": lambda: client.SendMessage(message(tenant, cid, "m1")),
            "GetConversation": lambda: client.GetConversation(
                chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=cid)
            ),
            "CloseConversation": lambda: client.CloseConversation(
                chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=cid)
            ),
            "RateConversation": lambda: client.RateConversation(
                chat_pb2.RateConversationRequest(tenant_id=tenant, conversation_id=cid, score=5)
            ),
            "StreamConversation": lambda: client.StreamConversation(
                chat_pb2.StreamConversationRequest(tenant_id=tenant, conversation_id=cid)
            ),
            "AcceptConversation": lambda: agents.AcceptConversation(
                agent_pb2.AcceptConversationRequest(tenant_id=tenant, conversation_id=cid, agent_id="ag")
            ),
            "SendAgentMessage": lambda: agents.SendAgentMessage(
                agent_pb2.SendAgentMessageRequest(
                    tenant_id=tenant, conversation_id=cid, agent_id="ag", client_message_id="x", text="hi"
                )
            ),
        }

    ready = await redis.hgetall(hv.READY_KEY)
    assert len(ready) == ingress.settings.topic_partitions
    partition = sorted(ready)[0]
    try:
        await redis.hdel(hv.READY_KEY, partition)  # what a Redis that lost data looks like
        answers = {name: await _code(call) for name, call in calls().items()}
        (batch,) = [r async for r in client.SendMessages(iter([message(tenant, cid, "m2")]))]
        answers["SendMessages"] = (
            (grpc.StatusCode.UNAVAILABLE, "")
            if (batch.error_code == grpc.StatusCode.UNAVAILABLE.value[0])
            else (None, f"error_code={batch.error_code}")
        )
        wrong = {n: a for n, a in answers.items() if a[0] != grpc.StatusCode.UNAVAILABLE}
        assert not wrong, f"not UNAVAILABLE while the hot view is incomplete: {wrong}"
        for name, (_, details) in answers.items():
            if name != "SendMessages":
                assert "retry-after-ms=None" not in details, (name, details)
    finally:
        await redis.hset(hv.READY_KEY, partition, ready[partition])
        await redis.aclose()
    # Once complete, a conversation the hot view does not have does not exist.
    try:
        answers = {name: await _code(call) for name, call in calls().items()}
        assert {n: a[0] for n, a in answers.items()} == {n: grpc.StatusCode.NOT_FOUND for n in answers}
    finally:
        await channel.close()


@pytest.mark.timeout(60)
async def test_a_late_claim_delete_spares_what_a_later_attempt_put_there(system: System) -> None:
    redis = aioredis.Redis.from_url(system.settings.redis_url)
    hot = IngressHotView(redis, system.settings.idempotency_ttl_s)
    t, c = f"t{uuid.uuid4().hex[:10]}", f"c{uuid.uuid4().hex[:10]}"
    try:
        # Attempt 1 claims; its write fails and its delete is retried late (Redis blipped).
        (first,) = await hot.claim_many([(t, c, "m1")])
        assert first.claimed
        # Meanwhile the claim expired and attempt 2 claimed the key.
        await redis.delete(hv.idempotency_key(t, c, "m1"))
        (second,) = await hot.claim_many([(t, c, "m1")])
        assert second.claimed
        await hot.settle_many([(first.held((t, c, "m1")), None)])  # attempt 1's late delete
        (third,) = await hot.claim_many([(t, c, "m1")])
        assert third.in_flight, "attempt 1's late delete removed attempt 2's claim"
        # Attempt 2's write landed and its ack is recorded; attempt 1's delete comes again.
        ack = Ack("01a22b68-dcb2-7c31-b33f-73378108d562", 1, 7)
        await hot.settle_many([(second.held((t, c, "m1")), ack)])
        await hot.settle_many([(first.held((t, c, "m1")), None)])
        (fourth,) = await hot.claim_many([(t, c, "m1")])
        assert fourth.earlier == ack, "attempt 1's late delete removed attempt 2's ack"
        # Its own claim, though, a failed attempt does drop.
        (other,) = await hot.claim_many([(t, c, "m2")])
        await hot.settle_many([(other.held((t, c, "m2")), None)])
        assert await redis.exists(hv.idempotency_key(t, c, "m2")) == 0
    finally:
        await redis.aclose()
