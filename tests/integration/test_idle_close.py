"""Idle close on real servers (issue 9, quotas): abandoned conversations stayed open for ever and
kept counting against the tenant's open-conversation quota. Now a conversation with no activity
for the tenant's idle time is closed by the system, through the same path as CloseConversation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from switchboard.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from schemas import hotview as hv
from schemas.events import Event, decode_event
from services.ingress import IngressServer
from services.ingress import _validation as v
from services.ingress._hotview import IngressHotView
from services.ingress._idle import IdleSweeper, lock_key
from services.ingress._producer import EventProducer
from services.ingress._writes import ConversationWrites
from services.processes import wait_for_ingress
from services.settings import Settings
from tests.conftest import System, eventually
from tests.integration.test_auth import cli
from tests.integration.test_ingress_guarantees import message, start
from tests.integration.test_ingress_review import stub_read
from tests.integration.test_quotas import create_tenant

pytestmark = pytest.mark.integration


@pytest.fixture
async def sweeping(system: System) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    """An ingress of its own whose sweeper looks for idle conversations five times a second (the
    system's sweeps every 30 s); the idle times are set per tenant with the CLI."""
    host, port = system.settings.grpc_listen.rsplit(":", 1)
    settings = Settings(
        **{
            **system.settings.model_dump(),
            "grpc_listen": f"{host}:{int(port) + 13}",
            "idle_sweep_interval_s": 0.2,
        }
    )
    server = IngressServer(settings)
    await server.start()
    try:
        await wait_for_ingress(settings)
        async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
            yield chat_pb2_grpc.ChatServiceStub(channel)
    finally:
        await server.stop(grace=1)


async def conversation(stub: chat_pb2_grpc.ChatServiceStub, tenant: str, cid: str) -> chat_pb2.Conversation:
    return await stub.GetConversation(chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=cid))


async def closed_event(redis: aioredis.Redis, tenant: str, cid: str) -> Event:
    """The conversation's ConversationClosed, from its live stream (the folded log)."""
    entries: Any = await redis.xrange(hv.live_stream_key(tenant, cid))
    suffix = hv.live_event_suffix(tenant, cid)  # entries leave the ids out
    events = [decode_event(fields[hv.S_EVENT.encode()] + suffix) for _, fields in entries]
    closes = [e for e in events if e.HasField("conversation_closed")]
    assert len(closes) == 1, closes
    return closes[0]


async def send_code(
    stub: chat_pb2_grpc.ChatServiceStub, request: chat_pb2.SendMessageRequest
) -> grpc.StatusCode:
    try:
        await stub.SendMessage(request)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.timeout(120)
async def test_an_idle_conversation_is_closed_by_the_system_and_frees_its_quota_place(
    system: System, sweeping: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    await create_tenant(system, tenant, "--max-open-conversations", "1")
    stub = sweeping
    opened: list[str] = []

    async def start_until_refused() -> grpc.StatusCode:
        # Starts succeed until the ingress has read the tenant's quota (within seconds).
        try:
            opened.append(await start(stub, tenant))
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    first_sent_ms = int(time.time() * 1000)
    await eventually(start_until_refused, lambda c: c is grpc.StatusCode.RESOURCE_EXHAUSTED, within_s=30)
    for i, cid in enumerate(opened):
        assert await send_code(stub, message(tenant, cid, f"m{i}")) is grpc.StatusCode.OK
    # The default idle time (24 h) closes nothing; the tenant's own does.
    done = await asyncio.to_thread(cli, system.env, "tenants", "update", tenant, "--idle-close-after", "2")
    assert done.returncode == 0 and "idle_close_after_s=2" in done.stdout, (done.stdout, done.stderr)

    # Nobody touches them: the system closes every one after the tenant's 2 s.
    for cid in opened:
        conv = await eventually(
            lambda cid=cid: conversation(stub, tenant, cid),  # type: ignore[misc]
            lambda c: c.status == chat_pb2.CONVERSATION_STATUS_CLOSED and c.resolution == "idle",
            within_s=60,
            what="the idle close",
        )
        assert conv.resolution == "idle" and conv.message_count == 1
        assert conv.closed_at.ToMilliseconds() >= first_sent_ms + 2000, "closed before it was idle for 2 s"
    redis = aioredis.Redis.from_url(system.settings.redis_url)
    try:
        event = await closed_event(redis, tenant, opened[0])
        assert event.conversation_closed.closed_by == events_pb2.SENDER_SYSTEM
        assert event.conversation_closed.resolution == "idle"
        assert await redis.zcard(hv.activity_key(tenant)) == 0
    finally:
        await redis.aclose()
    # Their places are free, and they refuse messages as any closed conversation does.
    assert await start_until_refused() is grpc.StatusCode.OK
    assert await send_code(stub, message(tenant, opened[0], "late")) is grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.timeout(120)
async def test_an_active_conversation_is_not_closed_while_an_idle_one_is(
    system: System, sweeping: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    await create_tenant(system, tenant, "--idle-close-after", "4")
    stub = sweeping
    active, idle = await start(stub, tenant), await start(stub, tenant)
    idle_closed_at: float | None = None
    sent = 0
    # The customer of `active` keeps writing (every 0.5 s, well inside the 4 s) until the idle one
    # was closed and then for longer than the idle time again.
    while idle_closed_at is None or time.monotonic() - idle_closed_at < 6:
        assert await send_code(stub, message(tenant, active, f"m{sent}")) is grpc.StatusCode.OK
        sent += 1
        if idle_closed_at is None:
            if (await conversation(stub, tenant, idle)).status == chat_pb2.CONVERSATION_STATUS_CLOSED:
                idle_closed_at = time.monotonic()
            assert sent < 120, "the idle conversation was not closed within a minute"
        await asyncio.sleep(0.5)
    conv = await conversation(stub, tenant, active)
    assert conv.status == chat_pb2.CONVERSATION_STATUS_OPEN
    assert (await conversation(stub, tenant, idle)).resolution == "idle"


@pytest.mark.timeout(180)
async def test_a_message_racing_an_idle_close_in_another_process_is_before_the_close_or_refused(
    system: System, tenant: str
) -> None:
    """As test_ingress_review's close race, with the idle close: process A claimed a message and
    is slow to hand it to its producer while process B's sweeper finds the conversation idle."""
    s = system.settings
    redis = aioredis.Redis.from_url(s.redis_url)
    producers = [EventProducer(s), EventProducer(s)]
    for p in producers:
        await p.start()
    a, b = (
        ConversationWrites(s, p, IngressHotView(redis, s.idempotency_ttl_s), stub_read) for p in producers
    )
    sweeper = IdleSweeper(s, redis, b)
    release = asyncio.Event()
    real_enqueue = producers[0].enqueue

    async def enqueue(event: Event, *, bounded: bool = True) -> asyncio.Future[object]:
        if event.HasField("message_received"):
            await release.wait()
        return await real_enqueue(event, bounded=bounded)

    producers[0].enqueue = enqueue  # type: ignore[method-assign]
    try:
        started = await b.start_conversation(
            chat_pb2.StartConversationRequest(
                tenant_id=tenant, channel=events_pb2.CHANNEL_WEB, customer_id="c"
            )
        )
        target = started.conversation_id
        # Folded and idle for a second (by the index the sessions worker keeps).
        await eventually(
            lambda: redis.zscore(hv.activity_key(tenant), target),
            lambda score: score is not None and score < time.time() * 1000 - 1000,
            within_s=30,
            what="the conversation idle for 1 s in the activity index",
        )
        send = asyncio.ensure_future(a.accept_messages([message(tenant, target, "m")]))
        key = hv.idempotency_key(tenant, target, "m")
        await eventually(lambda: redis.exists(key), lambda n: n == 1, within_s=10, what="m claimed in A")
        sweep = asyncio.ensure_future(sweeper.sweep_tenant(tenant, 1.0))
        conv_key = hv.conversation_key(tenant, target)

        async def held_or_closed() -> bool:
            return sweep.done() or bool(await redis.hexists(conv_key, hv.F_CLOSING))

        await eventually(held_or_closed, bool, within_s=10, what="the idle close's hold")
        assert not sweep.done(), "the idle close did not wait for another process's unsettled message"
        # One process sweeps a tenant at a time.
        assert await redis.exists(lock_key(tenant)) == 1
        assert await IdleSweeper(s, redis, a).sweep_tenant(tenant, 1.0) == 0
        # While the close waits for A's message, no process accepts a new one.
        for writes, cmid in ((b, "late"), (a, "late-a")):
            (late,) = await writes.accept_messages([message(tenant, target, cmid)])
            assert isinstance(late, v.RequestRejected) and late.code == grpc.StatusCode.UNAVAILABLE, late
            assert "being closed" in late.message
        release.set()
        (sent,) = await send
        assert isinstance(sent, chat_pb2.SendMessageResponse), sent
        assert await sweep == 1
        assert await redis.exists(lock_key(tenant)) == 0
        # Acked, so before the close in the log: the fold counts it.
        async with grpc.aio.insecure_channel(s.grpc_listen) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            state = await eventually(
                lambda: conversation(stub, tenant, target),
                lambda c: c.status == chat_pb2.CONVERSATION_STATUS_CLOSED and c.resolution == "idle",
                within_s=30,
            )
        assert state.message_count == 1 and [m.client_message_id for m in state.messages] == ["m"]
        assert state.resolution == "idle"
        assert (
            await closed_event(redis, tenant, target)
        ).conversation_closed.closed_by == events_pb2.SENDER_SYSTEM
        # Swept again: nothing left to close.
        assert await sweeper.sweep_tenant(tenant, 1.0) == 0
    finally:
        release.set()
        for p in producers:
            await p.stop()
        await redis.aclose()


@pytest.mark.timeout(120)
async def test_open_conversations_from_before_the_activity_index_are_backfilled_and_closed(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    """Conversations started by an earlier version have no activity entry (and their tenant is
    not in the sweeper's round): the backfill puts them in, so they are closed when idle too."""
    s = system.settings
    redis = aioredis.Redis.from_url(s.redis_url)
    producer = EventProducer(s)
    await producer.start()
    try:
        old, closed = await start(stub, tenant), await start(stub, tenant)
        await stub.CloseConversation(
            chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=closed)
        )
        index = hv.activity_key(tenant)
        await eventually(lambda: redis.zcard(index), lambda n: n == 1, within_s=30, what="the worker's index")
        score = await redis.zscore(index, old)
        assert score is not None
        # As an earlier version left Redis: no index, the tenant not in the round.
        await redis.delete(index)
        await redis.srem(hv.ACTIVE_TENANTS_KEY, tenant)
        writes = ConversationWrites(s, producer, IngressHotView(redis, s.idempotency_ttl_s), stub_read)
        sweeper = IdleSweeper(s, redis, writes)
        assert await sweeper.backfill() >= 1
        assert await redis.zscore(index, old) == score  # the closed one stays out
        assert await redis.zcard(index) == 1
        assert await redis.sismember(hv.ACTIVE_TENANTS_KEY, tenant)
        # Idle for a second since its start: closed by the sweep of its tenant.
        await eventually(
            lambda: redis.zscore(index, old),
            lambda sc: sc is not None and sc < time.time() * 1000 - 1000,
            within_s=10,
        )
        assert await sweeper.sweep_tenant(tenant, 1.0) == 1
        conv = await eventually(
            lambda: conversation(stub, tenant, old),
            lambda c: c.status == chat_pb2.CONVERSATION_STATUS_CLOSED and c.resolution == "idle",
            within_s=30,
        )
        assert conv.resolution == "idle"
    finally:
        await producer.stop()
        await redis.aclose()
