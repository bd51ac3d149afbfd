"""SendMessageBatch on the real stack (the test system's `switchboard ingress`, Kafka and Redis):
one result per message in order, per-conversation order in the log, idempotent retries of a whole
batch, refusals item by item, and the size bounds."""

from __future__ import annotations

import grpc
import pytest
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from tests.integration.conftest import System, eventually, start_conversation

pytestmark = pytest.mark.integration

OK = 0


def message(
    tenant: str, conversation_id: str, cmid: str, text: str = "hi 你好"
) -> chat_pb2.SendMessageRequest:
    return chat_pb2.SendMessageRequest(
        tenant_id=tenant, conversation_id=conversation_id, client_message_id=cmid, text=text
    )


def batch(*messages: chat_pb2.SendMessageRequest) -> chat_pb2.SendMessageBatchRequest:
    return chat_pb2.SendMessageBatchRequest(messages=messages)


def codes(response: chat_pb2.SendMessageBatchResponse) -> list[tuple[str, str, int]]:
    return [(r.client_message_id, r.conversation_id, r.error_code) for r in response.results]


async def history(stub: chat_pb2_grpc.ChatServiceStub, tenant: str, conversation_id: str) -> list[str]:
    conv = await stub.GetConversation(
        chat_pb2.GetConversationRequest(
            tenant_id=tenant, conversation_id=conversation_id, recent_messages=200
        )
    )
    return [m.client_message_id for m in conv.messages]


async def folded(
    stub: chat_pb2_grpc.ChatServiceStub, tenant: str, conversation_id: str, sent: list[str]
) -> None:
    """Wait until the hot view holds exactly `sent`, in that order (each message once)."""
    await eventually(
        lambda: history(stub, tenant, conversation_id),
        lambda seen: seen == sent,
        what=f"messages of {conversation_id} folded once each, in send order",
    )


async def test_results_come_in_order_and_each_conversation_is_written_in_order(
    stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    a = await start_conversation(stub, tenant, customer_id="a")
    b = await start_conversation(stub, tenant, customer_id="b")
    requests = [message(tenant, (a, b)[i % 3 == 0], f"m{i}", text=f"message {i}") for i in range(60)]
    response = await stub.SendMessageBatch(batch(*requests))
    assert codes(response) == [(r.client_message_id, r.conversation_id, OK) for r in requests]
    assert not any(r.duplicate for r in response.results)
    assert len({r.event_id for r in response.results}) == 60
    for conversation in (a, b):
        offsets = [r.offset for r in response.results if r.conversation_id == conversation]
        partitions = {r.partition for r in response.results if r.conversation_id == conversation}
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
        assert len(partitions) == 1  # one conversation, one partition
    # The hot view folds them in the order they were sent.
    for conversation in (a, b):
        await folded(
            stub,
            tenant,
            conversation,
            [r.client_message_id for r in requests if r.conversation_id == conversation],
        )


async def test_a_retried_batch_returns_the_first_acks_and_writes_nothing(
    stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    a = await start_conversation(stub, tenant, customer_id="a")
    b = await start_conversation(stub, tenant, customer_id="b")
    requests = batch(*(message(tenant, (a, b)[i % 2], f"r{i}") for i in range(20)))
    first = await stub.SendMessageBatch(requests)
    again = await stub.SendMessageBatch(requests)
    assert [r.error_code for r in again.results] == [OK] * 20
    assert all(r.duplicate for r in again.results)
    assert [(r.event_id, r.partition, r.offset) for r in again.results] == [
        (r.event_id, r.partition, r.offset) for r in first.results
    ]
    # Unary SendMessage sees the same claims.
    unary = await stub.SendMessage(message(tenant, a, "r0"))
    assert unary.duplicate and unary.event_id == first.results[0].event_id
    # A repeat inside one batch is answered with its first occurrence's ack.
    repeat = await stub.SendMessageBatch(batch(message(tenant, a, "x1"), message(tenant, a, "x1")))
    assert [r.duplicate for r in repeat.results] == [False, True]
    assert repeat.results[0].event_id == repeat.results[1].event_id
    await folded(stub, tenant, a, [f"r{i}" for i in range(0, 20, 2)] + ["x1"])


async def test_invalid_unknown_and_valid_items_are_answered_one_by_one(
    stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    a = await start_conversation(stub, tenant, customer_id="a")
    requests = [
        message(tenant, a, "ok1"),
        message(tenant, a, "empty", text="   "),
        message(tenant, "no-such-conversation", "lost"),
        message(tenant, f"{a}\n", "newline"),
        message(tenant, a, ""),
        message(tenant, a, "big", text="x" * 9000),
        message(tenant, a, "ok2"),
    ]
    response = await stub.SendMessageBatch(batch(*requests))
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert codes(response) == [
        ("ok1", a, OK),
        ("empty", a, invalid),
        ("lost", "no-such-conversation", grpc.StatusCode.NOT_FOUND.value[0]),
        ("newline", f"{a}\n", invalid),
        ("", a, invalid),
        ("big", a, invalid),
        ("ok2", a, OK),
    ]
    assert all(r.error_message for r in response.results if r.error_code)
    assert "8192" in response.results[5].error_message
    assert response.results[0].offset < response.results[6].offset
    # A refused item wrote nothing and claimed nothing: sending it fixed is a first write.
    fixed = await stub.SendMessage(message(tenant, a, "empty", text="now with text"))
    assert not fixed.duplicate


async def test_a_closed_conversations_items_are_refused_and_the_others_written(
    stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    open_ = await start_conversation(stub, tenant, customer_id="open")
    closed = await start_conversation(stub, tenant, customer_id="closed")
    await stub.CloseConversation(chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=closed))
    response = await stub.SendMessageBatch(
        batch(
            message(tenant, closed, "c1"),
            message(tenant, open_, "o1"),
            message(tenant, closed, "c2"),
            message(tenant, open_, "o2"),
        )
    )
    precondition = grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert codes(response) == [
        ("c1", closed, precondition),
        ("o1", open_, OK),
        ("c2", closed, precondition),
        ("o2", open_, OK),
    ]
    assert "closed" in response.results[0].error_message


async def test_a_batch_over_the_bounds_is_invalid_as_a_whole(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    a = await start_conversation(stub, tenant, customer_id="a")
    limit = system.settings.max_batch_messages
    too_many = batch(*(message(tenant, a, f"n{i}") for i in range(limit + 1)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SendMessageBatch(too_many)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(limit) in (err.value.details() or "")
    # Within the count but over the bytes: each text is at the per-message limit.
    text = "y" * system.settings.max_message_bytes
    count = system.settings.max_batch_bytes // len(text) + 1
    assert count <= limit
    too_big = batch(*(message(tenant, a, f"b{i}", text=text) for i in range(count)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SendMessageBatch(too_big)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "SWITCHBOARD_MAX_BATCH_BYTES" in (err.value.details() or "")
    # Nothing of either was written or claimed.
    first = await stub.SendMessage(message(tenant, a, "n0"))
    assert not first.duplicate
    assert await history(stub, tenant, a) in ([], ["n0"])
    empty = await stub.SendMessageBatch(batch())
    assert list(empty.results) == []
