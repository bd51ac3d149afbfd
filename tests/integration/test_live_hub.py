"""StreamConversation calls share a few blocking Redis connections (services/ingress/_live.py).

Before the hub every live call held a Redis connection of its own: N streams were N Redis clients,
past Redis's default maxclients (10,000) well before the 20k streams per process issue 7 asks for.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from services.ingress import _live
from services.ingress._live import LiveHub
from tests.conftest import System, eventually, start_conversation

pytestmark = pytest.mark.integration


async def blocked(redis: aioredis.Redis) -> int:
    """Clients blocked in a read (XREAD BLOCK): one per live call before the hub."""
    info: Any = await redis.info("clients")
    return int(info["blocked_clients"])


@pytest.mark.timeout(180)
async def test_many_streams_share_a_few_connections_and_each_gets_exactly_its_updates(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    redis = aioredis.Redis.from_url(system.settings.redis_url)
    conversations = [await start_conversation(stub, tenant) for _ in range(20)]
    first = {}
    for c in conversations:
        ack = await stub.SendMessage(
            chat_pb2.SendMessageRequest(
                tenant_id=tenant, conversation_id=c, client_message_id="m1", text="hi"
            )
        )
        first[c] = ack
    # Cursors of m1 as StreamConversation reports them (the start is the first update).
    cursors: dict[str, str] = {}
    for c in conversations:
        state = await eventually(
            lambda c=c: stub.GetConversation(  # type: ignore[misc]
                chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=c)
            ),
            lambda s: s.message_count == 1,
            within_s=30,
        )
        cursors[c] = state.cursor
    before = await blocked(redis)
    channels = [grpc.aio.insecure_channel(system.settings.grpc_listen) for _ in range(4)]
    stubs = [chat_pb2_grpc.ChatServiceStub(ch) for ch in channels]
    got: dict[int, list[str]] = {}
    calls = []
    # 10 calls per conversation: half from the beginning, half from m1's cursor.
    plan = [(c, "" if k % 2 == 0 else cursors[c]) for c in conversations for k in range(10)]

    async def follow(i: int, conversation: str, after: str) -> None:
        call = stubs[i % len(stubs)].StreamConversation(
            chat_pb2.StreamConversationRequest(
                tenant_id=tenant, conversation_id=conversation, after_cursor=after
            )
        )
        calls.append(call)
        async for update in call:
            if update.HasField("event"):
                kind = update.event.WhichOneof("payload")
                label = (
                    update.event.message_received.client_message_id if kind == "message_received" else kind
                )
                got.setdefault(i, []).append(label)

    tasks = [asyncio.ensure_future(follow(i, c, after)) for i, (c, after) in enumerate(plan)]
    try:
        # Every call from the beginning has replayed the start and m1.
        await eventually(
            lambda: asyncio.sleep(
                0, result=sum(1 for i, (_, a) in enumerate(plan) if not a and len(got.get(i, [])) >= 2)
            ),
            lambda n: n == len(plan) // 2,
            within_s=60,
            what="the replays",
        )
        # 200 calls over the ingress's processes: at most one more blocked reader per process
        # (one per 256 calls; a process may already have one from an earlier test), not 200.
        during = await blocked(redis)
        assert during - before <= max(system.settings.ingress_processes, 1), (before, during)
        for c in conversations:
            await stub.SendMessage(
                chat_pb2.SendMessageRequest(
                    tenant_id=tenant, conversation_id=c, client_message_id="m2", text="again"
                )
            )
        expected = {
            i: (["conversation_started", "m1", "m2"] if not after else ["m2"])
            for i, (_, after) in enumerate(plan)
        }
        await eventually(
            lambda: asyncio.sleep(0, result={i: got.get(i, []) for i in expected}),
            lambda seen: seen == expected,
            within_s=60,
            what="every call's updates, exactly once and in order",
        )
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
        await redis.aclose()


@pytest.mark.timeout(120)
async def test_a_slow_reader_is_paused_without_holding_back_the_others_and_misses_nothing(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_live, "PAUSE_AT", 5)
    monkeypatch.setattr(_live, "RESUME_AT", 1)
    control = aioredis.Redis.from_url(system.settings.redis_url)
    hub = LiveHub(system.settings.redis_url, control, per_reader=4, block_ms=2_000)
    slow_key, fast_key = (f"test:hub:{uuid.uuid4().hex}:{name}" for name in ("slow", "fast"))
    slow = hub.subscribe({slow_key: "0-0"})
    fast = hub.subscribe({fast_key: "0-0"})
    try:
        for n in range(30):
            await control.xadd(slow_key, {"n": str(n)})
            await control.xadd(fast_key, {"n": str(n)})
            # The fast reader gets each entry while the slow one reads nothing.
            ((key, entries),) = await asyncio.wait_for(fast.next(), 10)
            assert key == fast_key and [e[1][b"n"] for e in entries] == [str(n).encode()]
        assert slow.paused
        assert hub.connections == 1
        seen: list[int] = []
        while len(seen) < 30:
            for _, entries in await asyncio.wait_for(slow.next(), 10):
                seen += [int(e[1][b"n"]) for e in entries]
        assert seen == list(range(30))
        assert not slow.paused
        await control.xadd(slow_key, {"n": "30"})
        ((_, entries),) = await asyncio.wait_for(slow.next(), 10)
        assert [e[1][b"n"] for e in entries] == [b"30"]
    finally:
        slow.close()
        fast.close()
        await hub.close()
        await control.delete(slow_key, fast_key)
        await control.aclose()


@pytest.mark.timeout(60)
async def test_a_call_joining_a_blocked_reader_is_read_at_once(system: System) -> None:
    # The reader is blocked for a minute over the first call's stream; the second call's entry
    # must arrive long before that (CLIENT UNBLOCK), not when the block times out.
    control = aioredis.Redis.from_url(system.settings.redis_url)
    hub = LiveHub(system.settings.redis_url, control, per_reader=4, block_ms=60_000)
    first_key, second_key = (f"test:hub:{uuid.uuid4().hex}:{name}" for name in ("a", "b"))
    first = hub.subscribe({first_key: "0-0"})
    try:
        await control.xadd(first_key, {"n": "0"})
        await asyncio.wait_for(first.next(), 10)  # the reader is now blocked again, on first_key only
        await control.xadd(second_key, {"n": "1"})
        second = hub.subscribe({second_key: "0-0"})
        ((key, entries),) = await asyncio.wait_for(second.next(), 20)
        assert key == second_key and entries[0][1][b"n"] == b"1"
        second.close()
    finally:
        first.close()
        await hub.close()
        await control.delete(first_key, second_key)
        await control.aclose()
