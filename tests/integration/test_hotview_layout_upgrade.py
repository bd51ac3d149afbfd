"""A hot view written by the version before the compact layout (live-stream entries holding the
whole event, states holding the client message ids themselves) is read and carried on by this one:
`make run` stopped and started again keeps the Redis it had."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from switchboard.v1 import chat_pb2, events_pb2

from schemas import hotview as hv
from schemas.events import decode_event, encode_event, new_event
from services.settings import Settings
from streams._consumer import Record
from streams.sessions import ConversationState
from streams.sessions._worker import SessionsProcessor
from tests.conftest import System, eventually, start_conversation
from tests.integration.test_sessions_hotview import Control

pytestmark = pytest.mark.integration


async def rewrite_in_the_old_layout(redis: aioredis.Redis, tenant: str, conversation: str) -> int:
    """The conversation's live stream as the previous version wrote it: each entry's whole event.
    Returns how many entries there are."""
    key = hv.live_stream_key(tenant, conversation)
    suffix = hv.live_event_suffix(tenant, conversation)
    entries: Any = await redis.xrange(key)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        for entry_id, fields in entries:
            whole = dict(fields)
            whole[hv.S_EVENT.encode()] = encode_event(decode_event(fields[hv.S_EVENT.encode()] + suffix))
            pipe.xadd(key, whole, id=entry_id)
        await pipe.execute()
    return len(entries)


@pytest.mark.timeout(120)
async def test_the_ingress_reads_live_entries_written_whole_beside_compact_ones(
    system: System, stub: Any, tenant: str
) -> None:
    redis = aioredis.Redis.from_url(system.settings.redis_url)
    try:
        cid = await start_conversation(stub, tenant, customer_id="c-upgrade")
        for n in (1, 2):
            await stub.SendMessage(
                chat_pb2.SendMessageRequest(
                    tenant_id=tenant, conversation_id=cid, client_message_id=f"m{n}", text=f"旧的 {n}"
                )
            )
        live = hv.live_stream_key(tenant, cid)
        await eventually(lambda: redis.xlen(live), lambda n: n == 3, what="3 events folded")
        assert await rewrite_in_the_old_layout(redis, tenant, cid) == 3
        await stub.SendMessage(
            chat_pb2.SendMessageRequest(
                tenant_id=tenant, conversation_id=cid, client_message_id="m3", text="新的"
            )
        )
        await eventually(lambda: redis.xlen(live), lambda n: n == 4, what="the new message folded")
        # Three entries written whole, the new one without the ids.
        entries: Any = await redis.xrange(live)
        raw_ids = [events_pb2.Event.FromString(f[hv.S_EVENT.encode()]).conversation_id for _, f in entries]
        assert raw_ids == [cid, cid, cid, ""]

        conv = await stub.GetConversation(
            chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=cid)
        )
        assert [(m.client_message_id, m.text) for m in conv.messages] == [
            ("m1", "旧的 1"),
            ("m2", "旧的 2"),
            ("m3", "新的"),
        ]

        call = stub.StreamConversation(
            chat_pb2.StreamConversationRequest(tenant_id=tenant, conversation_id=cid)
        )
        updates = []
        async for update in call:
            updates.append(update)
            if len(updates) == 4:
                break
        call.cancel()
        assert [u.event.WhichOneof("payload") for u in updates] == ["conversation_started"] + [
            "message_received"
        ] * 3
        assert {(u.event.tenant_id, u.event.conversation_id) for u in updates} == {(tenant, cid)}
        assert [u.message_count for u in updates] == [0, 1, 2, 3]
    finally:
        await redis.aclose()


def record(offset: int, event: events_pb2.Event) -> Record:
    return Record("conversation-events", 0, offset, event.conversation_id.encode(), encode_event(event), 0)


async def test_the_worker_carries_on_a_state_that_holds_the_client_message_ids(local_stack: Settings) -> None:
    # A logical database of its own: the processes of the session's system use db 0.
    redis = aioredis.Redis.from_url(local_stack.redis_url.rsplit("/", 1)[0] + "/11")
    await redis.flushdb()
    tenant, cid = f"t{uuid.uuid4().hex[:8]}", "c-upgrade"
    events = [
        new_event(tenant, cid, conversation_started=events_pb2.ConversationStarted()),
        *(
            new_event(tenant, cid, message_received=events_pb2.MessageReceived(client_message_id=m, text=m))
            for m in ("m1", "m2", "m1", "m3")  # the second m1: a retry whose first ack was lost
        ),
    ]
    processor = SessionsProcessor(local_stack, redis)
    try:
        # What the previous version left after applying offsets 0-2: the state with the ids in
        # full, entries with whole events, its position.
        old = ConversationState(
            tenant_id=tenant,
            conversation_id=cid,
            message_count=2,
            customer_message_count=2,
            event_count=3,
            last_partition=0,
            last_offset=2,
            last_event_id=events[2].event_id,
        )
        # Every field, as that version wrote them.
        document: dict[str, Any] = {f.name: getattr(old, f.name) for f in dataclasses.fields(old)}
        del document["recent_message_digests"]
        document |= {"recent_decisions": [], "recent_client_message_ids": ["m1", "m2"]}
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(hv.conversation_key(tenant, cid), mapping={hv.F_STATE: json.dumps(document)})
            for offset in range(3):
                pipe.xadd(
                    hv.live_stream_key(tenant, cid),
                    {hv.S_EVENT: encode_event(events[offset]), hv.S_STATUS: "open", hv.S_MESSAGES: offset},
                    id=hv.live_stream_id(offset),
                )
            pipe.hset(hv.APPLIED_KEY, "0", "3")
            await pipe.execute()
        await processor.on_assigned({0}, Control(end=5))
        assert await processor.process([record(3, events[3]), record(4, events[4])]) == []

        raw = await redis.hget(hv.conversation_key(tenant, cid), hv.F_STATE)
        assert raw is not None
        written = json.loads(raw)
        assert (written["message_count"], written["event_count"]) == (3, 4)  # m1 again: not counted
        assert "recent_client_message_ids" not in written and written["recent_message_digests"]
        entries: Any = await redis.xrange(hv.live_stream_key(tenant, cid))
        assert [e[0] for e in entries] == [hv.live_stream_id(o).encode() for o in (0, 1, 2, 4)]
        suffix = hv.live_event_suffix(tenant, cid)
        assert [decode_event(f[hv.S_EVENT.encode()] + suffix) for _, f in entries] == [
            events[o] for o in (0, 1, 2, 4)
        ]
    finally:
        await redis.flushdb()
        await redis.aclose()
