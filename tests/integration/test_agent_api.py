"""AgentService and RateConversation on the real stack: a handoff (a HandoffRequested event in
the log) puts the conversation in its queue; of two agents racing to accept, exactly one wins;
only the winner may reply, idempotently; transfer, return to the bot, and CSAT reach the state."""

from __future__ import annotations

import asyncio
import contextlib
import json

import grpc
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from switchboard.v1 import agent_pb2, agent_pb2_grpc, chat_pb2, chat_pb2_grpc, events_pb2

from schemas import hotview as hv
from schemas.events import encode_event, event_headers, event_key, new_event
from tests.conftest import System, eventually, start_conversation

pytestmark = pytest.mark.integration


async def hand_off(system: System, tenant: str, conversation_id: str, queue: str) -> None:
    """What the assistant writes when a customer asks for a person."""
    event = new_event(
        tenant,
        conversation_id,
        handoff_requested=events_pb2.HandoffRequested(reason="talk_to_human", queue=queue),
    )
    producer = AIOKafkaProducer(bootstrap_servers=system.settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            system.settings.conversation_topic,
            encode_event(event),
            key=event_key(event),
            headers=event_headers(event),
        )
    finally:
        await producer.stop()


async def queued(
    agents: agent_pb2_grpc.AgentServiceStub, tenant: str, queue: str = ""
) -> list[agent_pb2.QueuedConversation]:
    reply = await agents.ListQueue(agent_pb2.ListQueueRequest(tenant_id=tenant, queue=queue))
    return list(reply.conversations)


async def state(redis: aioredis.Redis, tenant: str, conversation_id: str) -> dict[str, object]:
    raw = await redis.hget(hv.conversation_key(tenant, conversation_id), hv.F_STATE)
    return json.loads(raw) if raw else {}


async def waiting_conversation(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, agents: agent_pb2_grpc.AgentServiceStub, tenant: str
) -> str:
    cid = await start_conversation(stub, tenant, channel=events_pb2.CHANNEL_WEB, customer_id="c1")
    await hand_off(system, tenant, cid, "vip")
    waiting = await eventually(
        lambda: queued(agents, tenant), lambda q: len(q) == 1, within_s=60, what="conversation queued"
    )
    assert (waiting[0].conversation_id, waiting[0].queue, waiting[0].reason) == (cid, "vip", "talk_to_human")
    assert waiting[0].waiting_since.seconds > 0
    return cid


@pytest.mark.timeout(300)
async def test_two_agents_race_one_wins_and_replies(
    system: System,
    stub: chat_pb2_grpc.ChatServiceStub,
    agents: agent_pb2_grpc.AgentServiceStub,
    redis: aioredis.Redis,
    tenant: str,
) -> None:
    cid = await waiting_conversation(system, stub, agents, tenant)
    assert [c.conversation_id for c in await queued(agents, tenant, "vip")] == [cid]

    async def accept(agent: str) -> chat_pb2.Conversation | grpc.aio.AioRpcError:
        try:
            return await agents.AcceptConversation(
                agent_pb2.AcceptConversationRequest(tenant_id=tenant, conversation_id=cid, agent_id=agent)
            )
        except grpc.aio.AioRpcError as exc:
            return exc

    outcomes = await asyncio.gather(*(accept(f"agent-{i}") for i in range(6)))
    winners = [o for o in outcomes if isinstance(o, chat_pb2.Conversation)]
    losers = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(winners) == 1, outcomes
    winner = winners[0].assignee
    assert winners[0].mode == chat_pb2.CONVERSATION_MODE_AGENT and winner.startswith("agent-")
    assert all(e.code() == grpc.StatusCode.FAILED_PRECONDITION for e in losers)
    assert all(f"already accepted by {winner!r}" in (e.details() or "") for e in losers)

    # Only the winner may write; a retry of the same client_message_id writes nothing new.
    send = agent_pb2.SendAgentMessageRequest(
        tenant_id=tenant,
        conversation_id=cid,
        agent_id=winner,
        client_message_id="a1",
        text="您好，我是客服小王",
    )
    first = await agents.SendAgentMessage(send)
    again = await agents.SendAgentMessage(send)
    assert not first.duplicate and again.duplicate and again.event_id == first.event_id
    other = "agent-x" if winner != "agent-x" else "agent-y"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await agents.SendAgentMessage(
            agent_pb2.SendAgentMessageRequest(
                tenant_id=tenant, conversation_id=cid, agent_id=other, client_message_id="a2", text="hi"
            )
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

    async def view() -> chat_pb2.Conversation:
        return await stub.GetConversation(
            chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=cid)
        )

    conv = await eventually(
        view, lambda c: any(m.text == "您好，我是客服小王" for m in c.messages), within_s=60
    )
    agent_messages = [m for m in conv.messages if m.sender == events_pb2.SENDER_AGENT]
    assert [(m.client_message_id, m.text) for m in agent_messages] == [("a1", "您好，我是客服小王")]
    assert conv.assignee == winner and conv.mode == chat_pb2.CONVERSATION_MODE_AGENT
    assert await queued(agents, tenant) == []

    # The winner's retried accept is answered, not refused.
    retried = await accept(winner)
    assert isinstance(retried, chat_pb2.Conversation) and retried.assignee == winner


@pytest.mark.timeout(300)
async def test_transfer_return_to_bot_and_csat(
    system: System,
    stub: chat_pb2_grpc.ChatServiceStub,
    agents: agent_pb2_grpc.AgentServiceStub,
    redis: aioredis.Redis,
    tenant: str,
) -> None:
    cid = await waiting_conversation(system, stub, agents, tenant)
    await agents.AcceptConversation(
        agent_pb2.AcceptConversationRequest(tenant_id=tenant, conversation_id=cid, agent_id="alice")
    )
    # Only the holder transfers.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await agents.TransferConversation(
            agent_pb2.TransferConversationRequest(
                tenant_id=tenant, conversation_id=cid, agent_id="mallory", to_agent_id="bob"
            )
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    moved = await agents.TransferConversation(
        agent_pb2.TransferConversationRequest(
            tenant_id=tenant, conversation_id=cid, agent_id="alice", to_agent_id="bob"
        )
    )
    assert moved.assignee == "bob"
    await eventually(lambda: state(redis, tenant, cid), lambda s: s.get("assignee") == "bob", within_s=60)

    # Back to a queue: waiting again, and acceptable again (a new handoff).
    requeued = await agents.TransferConversation(
        agent_pb2.TransferConversationRequest(
            tenant_id=tenant, conversation_id=cid, agent_id="bob", to_queue="billing"
        )
    )
    assert requeued.assignee == ""
    waiting = await eventually(lambda: queued(agents, tenant, "billing"), lambda q: len(q) == 1, within_s=60)
    assert waiting[0].reason == "transfer"
    await agents.AcceptConversation(
        agent_pb2.AcceptConversationRequest(tenant_id=tenant, conversation_id=cid, agent_id="carol")
    )
    back = await agents.ReturnToBot(
        agent_pb2.ReturnToBotRequest(tenant_id=tenant, conversation_id=cid, agent_id="carol")
    )
    assert back.mode == chat_pb2.CONVERSATION_MODE_BOT and back.assignee == ""
    await eventually(lambda: state(redis, tenant, cid), lambda s: s.get("mode") == "bot", within_s=60)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await agents.SendAgentMessage(
            agent_pb2.SendAgentMessageRequest(
                tenant_id=tenant, conversation_id=cid, agent_id="carol", client_message_id="late", text="hi"
            )
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # CSAT, after the close too.
    await stub.CloseConversation(chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=cid))
    for bad in (0, 6):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RateConversation(
                chat_pb2.RateConversationRequest(tenant_id=tenant, conversation_id=cid, score=bad)
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    rated = await stub.RateConversation(
        chat_pb2.RateConversationRequest(tenant_id=tenant, conversation_id=cid, score=4, comment="快，谢谢")
    )
    assert rated.conversation_id == cid
    await eventually(lambda: state(redis, tenant, cid), lambda s: s.get("csat_score") == 4, within_s=60)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RateConversation(
            chat_pb2.RateConversationRequest(tenant_id=tenant, conversation_id="nope", score=5)
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.timeout(180)
async def test_reply_deltas_stream_live_and_keep_event_cursors(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, redis: aioredis.Redis, tenant: str
) -> None:
    """Deltas (what the assistant XADDs while generating) reach StreamConversation between
    events; each carries the cursor of the last event sent, so resuming from it repeats nothing."""
    cid = await start_conversation(stub, tenant, channel=events_pb2.CHANNEL_WEB, customer_id="c1")
    key = hv.reply_stream_key(tenant, cid)
    # A delta from before the call began is not replayed.
    stale = chat_pb2.ReplyDelta(reply_id="r0", index=0, text="old")
    await redis.xadd(key, {b"d": stale.SerializeToString()})

    call = stub.StreamConversation(chat_pb2.StreamConversationRequest(tenant_id=tenant, conversation_id=cid))
    updates: list[chat_pb2.ConversationUpdate] = []

    async def read() -> None:
        async for update in call:
            updates.append(update)

    reader = asyncio.ensure_future(read())
    try:
        await eventually(
            lambda: asyncio.sleep(0, len(updates)), lambda n: n >= 1, within_s=60, what="start event"
        )
        started_cursor = updates[0].cursor
        assert updates[0].event.HasField("conversation_started")
        await asyncio.sleep(0.3)  # the call's blocking read is in place
        for i, text in enumerate(["您好", "，订单", "已发货"]):
            delta = chat_pb2.ReplyDelta(reply_id="r1", index=i, text=text, message_event_id="m")
            await redis.xadd(key, {b"d": delta.SerializeToString()})
        await eventually(lambda: asyncio.sleep(0, len(updates)), lambda n: n >= 4, within_s=30, what="deltas")
        deltas = [u for u in updates if u.HasField("reply_delta")]
        assert [d.reply_delta.text for d in deltas] == ["您好", "，订单", "已发货"]
        assert all(d.cursor == started_cursor and not d.HasField("event") for d in deltas)

        await stub.SendMessage(
            chat_pb2.SendMessageRequest(
                tenant_id=tenant, conversation_id=cid, client_message_id="m1", text="hi"
            )
        )
        await eventually(
            lambda: asyncio.sleep(0, [u for u in updates if u.event.HasField("message_received")]),
            lambda found: len(found) == 1,
            within_s=60,
            what="the message event",
        )
    finally:
        call.cancel()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await reader
    # Resuming from a delta's cursor replays the events after it, never the deltas.
    resumed = stub.StreamConversation(
        chat_pb2.StreamConversationRequest(tenant_id=tenant, conversation_id=cid, after_cursor=started_cursor)
    )
    first = await asyncio.wait_for(resumed.read(), timeout=30)
    resumed.cancel()
    assert first.event.HasField("message_received") and first.event.message_received.client_message_id == "m1"


@pytest.mark.timeout(300)
async def test_an_agent_message_id_equal_to_a_customers_is_its_own_message(
    system: System,
    stub: chat_pb2_grpc.ChatServiceStub,
    agents: agent_pb2_grpc.AgentServiceStub,
    redis: aioredis.Redis,
    tenant: str,
) -> None:
    """Customer apps and agent desks choose their client_message_ids apart (both may count 1, 2,
    3…). Before: an agent message whose id a customer message already had was answered with the
    customer's ack (duplicate=true) and never written: an acknowledged message lost."""
    cid = await waiting_conversation(system, stub, agents, tenant)
    await agents.AcceptConversation(
        agent_pb2.AcceptConversationRequest(tenant_id=tenant, conversation_id=cid, agent_id="agent-1")
    )
    customer = chat_pb2.SendMessageRequest(
        tenant_id=tenant, conversation_id=cid, client_message_id="1", text="我的订单还没到"
    )
    agent = agent_pb2.SendAgentMessageRequest(
        tenant_id=tenant, conversation_id=cid, agent_id="agent-1", client_message_id="1", text="我来查一下"
    )
    c1 = await stub.SendMessage(customer)
    a1 = await agents.SendAgentMessage(agent)
    assert not a1.duplicate and a1.event_id != c1.event_id, (c1, a1)
    # Each retry gets its own first ack.
    c2, a2 = await stub.SendMessage(customer), await agents.SendAgentMessage(agent)
    assert c2.duplicate and c2.event_id == c1.event_id
    assert a2.duplicate and a2.event_id == a1.event_id
    # Both are in the conversation, once each (the fold deduplicates each kind on its own ids).
    conv = await eventually(
        lambda: stub.GetConversation(chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=cid)),
        lambda c: any(m.text == "我来查一下" for m in c.messages),
        within_s=60,
        what="the agent's message in the hot view",
    )
    assert sorted((m.sender, m.client_message_id, m.text) for m in conv.messages if m.client_message_id) == [
        (events_pb2.SENDER_CUSTOMER, "1", "我的订单还没到"),
        (events_pb2.SENDER_AGENT, "1", "我来查一下"),
    ]
    # The sessions worker records (and, after a Redis loss, rebuilds) each claim under the key the
    # ingress claims it with, so a retry after a rebuild still finds its own ack.
    agent_key = hv.idempotency_key(tenant, cid, hv.agent_claim("1"))
    customer_key = hv.idempotency_key(tenant, cid, "1")
    agent_raw: bytes = await redis.get(agent_key) or b""  # type: ignore[assignment]
    customer_raw: bytes = await redis.get(customer_key) or b""  # type: ignore[assignment]
    assert hv.decode_claim(agent_raw or b"pending") is not None
    assert (hv.decode_claim(agent_raw) or ("",))[0] == a1.event_id
    assert (hv.decode_claim(customer_raw) or ("",))[0] == c1.event_id
    # And both are messages in ClickHouse (the projector keys the agent's in its own space).
    ch = system.clickhouse()
    try:
        rows = await eventually(
            lambda: asyncio.to_thread(
                lambda: (
                    ch.query(
                        "SELECT sender, client_message_id FROM switchboard.messages "
                        "WHERE tenant_id = {t:String} AND conversation_id = {c:String} ORDER BY sender",
                        parameters={"t": tenant, "c": cid},
                    ).result_rows
                )
            ),
            lambda r: len(r) >= 2,
            within_s=60,
            what="both messages projected",
        )
    finally:
        ch.close()
    assert rows == [("agent", "1"), ("customer", "1")]
