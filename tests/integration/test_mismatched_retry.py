"""A client_message_id reused for a different message is refused, not answered as its retry.

A new user's walkthrough: SendMessage with client_message_id "m1" and "hello", then "m1" again
with "goodbye", answered the first ack with duplicate=true: "goodbye" was never written, and the
client was told it was. Like Stripe's and Twilio's idempotency keys, a key names one request: a
retry carries the same text (and gets the first ack); another text under the same key is
ALREADY_EXISTS, and nothing is written for it."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio as aioredis
from switchboard.v1 import agent_pb2, agent_pb2_grpc, chat_pb2, chat_pb2_grpc, events_pb2

from schemas import hotview as hv
from tests.conftest import start_conversation
from tests.integration.conftest import System, eventually
from tests.integration.test_agent_api import waiting_conversation

pytestmark = pytest.mark.integration


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def settled(redis: aioredis.Redis, key: str) -> bytes:
    async def read() -> bytes | None:
        raw: bytes | None = await redis.get(key)  # type: ignore[assignment]
        return raw

    raw = await eventually(
        read,
        lambda raw: raw is not None and hv.decode_claim(raw) is not None,
        within_s=30,
        what=f"the claim {key!r} settled",
    )
    assert raw is not None
    return raw


async def test_a_customer_message_id_reused_for_another_text_is_already_exists(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, redis: aioredis.Redis, tenant: str
) -> None:
    cid = await start_conversation(stub, tenant)

    def send(text: str, key: str = "m1") -> chat_pb2.SendMessageRequest:
        return chat_pb2.SendMessageRequest(
            tenant_id=tenant, conversation_id=cid, client_message_id=key, text=text
        )

    first = await stub.SendMessage(send("我的订单还没到"))
    # At once (the ack may not be recorded in Redis yet: answered from the process's own acks)...
    err = await refused(stub.SendMessage(send("where is my order")))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err
    assert "'m1'" in (err.details() or "") and "different text" in (err.details() or ""), err.details()
    # ...and once the claim is settled in Redis (what any other ingress process reads).
    await settled(redis, hv.idempotency_key(tenant, cid, "m1"))
    err = await refused(stub.SendMessage(send("where is my order")))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err
    again = await stub.SendMessage(send("我的订单还没到"))
    assert again.duplicate and again.event_id == first.event_id

    # In a batch: a repeat of a key with another text is refused on its own; the same text is a
    # duplicate; the refusal holds back nothing after it.
    batch = await stub.SendMessageBatch(
        chat_pb2.SendMessageBatchRequest(
            messages=[
                send("a", "m2"),
                send("b", "m2"),
                send("a", "m2"),
                send("where is my order"),
                send("c", "m3"),
            ]
        )
    )
    codes = [r.error_code for r in batch.results]
    already = grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert codes == [0, already, 0, already, 0], batch
    assert batch.results[2].duplicate and batch.results[2].event_id == batch.results[0].event_id
    assert not batch.results[4].duplicate

    # A repeat after a refused first is compared with what was written (review: it copied the
    # refusal, so the genuine retry in the same batch was refused too).
    batch = await stub.SendMessageBatch(
        chat_pb2.SendMessageBatchRequest(messages=[send("where is my order"), send("我的订单还没到")])
    )
    assert [r.error_code for r in batch.results] == [already, 0], batch
    assert batch.results[1].duplicate and batch.results[1].event_id == first.event_id

    # Nothing of the refused texts was written.
    conv = await eventually(
        lambda: stub.GetConversation(chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=cid)),
        lambda c: any(m.text == "c" for m in c.messages),
        within_s=60,
        what="the batch in the hot view",
    )
    assert [m.text for m in conv.messages if m.client_message_id] == ["我的订单还没到", "a", "c"]


async def test_the_settled_claim_carries_the_texts_digest(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, redis: aioredis.Redis, tenant: str
) -> None:
    """What a retry in any ingress process reads: the first ack and the digest of its text."""
    cid = await start_conversation(stub, tenant)
    req = chat_pb2.SendMessageRequest(
        tenant_id=tenant, conversation_id=cid, client_message_id="k", text="退款"
    )
    ack = await stub.SendMessage(req)
    raw = await settled(redis, hv.idempotency_key(tenant, cid, "k"))
    assert raw.decode() == hv.encode_claim(ack.event_id, ack.partition, ack.offset, hv.claim_digest("退款"))


async def test_an_agent_message_id_reused_for_another_text_is_already_exists(
    system: System,
    stub: chat_pb2_grpc.ChatServiceStub,
    agents: agent_pb2_grpc.AgentServiceStub,
    tenant: str,
) -> None:
    cid = await waiting_conversation(system, stub, agents, tenant)
    await agents.AcceptConversation(
        agent_pb2.AcceptConversationRequest(tenant_id=tenant, conversation_id=cid, agent_id="agent-1")
    )

    def reply(text: str) -> agent_pb2.SendAgentMessageRequest:
        return agent_pb2.SendAgentMessageRequest(
            tenant_id=tenant, conversation_id=cid, agent_id="agent-1", client_message_id="r1", text=text
        )

    first = await agents.SendAgentMessage(reply("我来查一下"))
    err = await refused(agents.SendAgentMessage(reply("稍等")))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err
    again = await agents.SendAgentMessage(reply("我来查一下"))
    assert again.duplicate and again.event_id == first.event_id


async def test_a_conversation_id_started_again_for_another_customer_is_already_exists(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    """A new user's walkthrough: StartConversation with an existing conversation_id and another
    customer_id returned the existing conversation (of the first customer) without a word; of 32
    concurrent starts with one id and 32 customers, 31 callers were handed someone else's."""

    def start(
        customer: str, channel: events_pb2.Channel = events_pb2.CHANNEL_WEB
    ) -> chat_pb2.StartConversationRequest:
        return chat_pb2.StartConversationRequest(
            tenant_id=tenant, conversation_id="order-42", customer_id=customer, channel=channel
        )

    first = await stub.StartConversation(start("alice"))
    again = await stub.StartConversation(start("alice"))  # a retry: the same conversation
    assert (again.conversation_id, again.customer_id, again.created_at) == (
        first.conversation_id,
        "alice",
        first.created_at,
    )
    for other in (start("bob"), start("alice", events_pb2.CHANNEL_IOS)):
        err = await refused(stub.StartConversation(other))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err
        assert "'order-42'" in (err.details() or ""), err.details()
