"""GetConversation answers one consistent view while the conversation is being written.

Seen (the flaky durability test, 2 of 16 runs and one fresh-clone CI): after every sentinel was
the last message of its conversation, the message counts summed to one less than the messages
sent, while Kafka and ClickHouse had every message exactly once. The read took the state (count,
cursor) and the recent messages from Redis in two round trips: a fold written in between gave a
view whose last message was not yet counted, and whose `cursor` (where StreamConversation goes on)
was older than its last message, so following on from it delivered that message twice.
"""

from __future__ import annotations

import asyncio

import pytest
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from tests.integration.conftest import System, eventually, start_conversation

pytestmark = pytest.mark.integration


def _stream_id(cursor: str) -> tuple[int, int]:
    ms, _, seq = cursor.partition(".")[0].partition("-")
    return int(ms), int(seq or 0)


@pytest.mark.timeout(300)
async def test_count_cursor_and_messages_agree_under_writes(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    conversation_id = await start_conversation(stub, tenant)
    request = chat_pb2.GetConversationRequest(
        tenant_id=tenant, conversation_id=conversation_id, recent_messages=3
    )
    # The reads below must overlap the folds: first the sessions worker is seen folding at all
    # (after tests that restart Kafka it may still be rejoining its group).
    await stub.SendMessage(
        chat_pb2.SendMessageRequest(
            tenant_id=tenant, conversation_id=conversation_id, client_message_id="first", text="first"
        )
    )
    await eventually(
        lambda: stub.GetConversation(request),
        lambda c: c.message_count >= 1,
        within_s=90,
        what="the first message folded",
    )
    total = 1500
    sent = 0

    async def send() -> None:
        nonlocal sent
        queue = iter(range(total))

        async def one_sender() -> None:
            nonlocal sent
            for i in queue:
                await stub.SendMessage(
                    chat_pb2.SendMessageRequest(
                        tenant_id=tenant,
                        conversation_id=conversation_id,
                        client_message_id=f"m{i}",
                        text=f"m{i}",
                    )
                )
                sent += 1

        await asyncio.gather(*(one_sender() for _ in range(4)))

    sending = asyncio.create_task(send())
    reads = 0
    counts_seen: set[int] = set()
    torn: list[str] = []
    while not sending.done() or reads == 0:
        conv = await stub.GetConversation(request)
        reads += 1
        counts_seen.add(conv.message_count)
        if not conv.messages:
            continue
        last = conv.messages[-1]
        if last.sequence != conv.message_count or _stream_id(last.cursor) > _stream_id(conv.cursor):
            torn.append(
                f"count {conv.message_count}, cursor {conv.cursor}; last message #{last.sequence} at {last.cursor}"
            )
    await sending
    # The reads overlapped the writes (otherwise this could not fail): many counts were seen.
    assert len(counts_seen) > 50, f"only {len(counts_seen)} distinct counts in {reads} reads"
    assert not torn, f"{len(torn)} of {reads} reads were torn, e.g. {torn[:3]}"
