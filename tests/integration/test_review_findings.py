"""Hostile review of 7b7fb1a (close waits across processes), db82682 (quotas) and 8eb07ab (LiveHub),
on real Redis. Each test reproduced a finding (failing before its fix).

- LiveHub: a call that joins (or a paused call that resumes) while its reader's XREAD is returning
  data is given that reply's entries past its own cursor, though the read started from the other
  calls' later position: the entries in between are skipped for good.
- LiveHub: a wake-up requested while the previous one's CLIENT UNBLOCK is still in flight is
  dropped: the reader has already re-read without the new call, so the call waits a whole block
  (5 s in the ingress) for anything.
- Close hold: `release_close` deletes the `closing` field whoever holds it, so a close that gave up
  (or that Kafka refused) removes the hold of a close another process started meanwhile; sends are
  claimed again in every process while that close is published.
- Close hold on a Redis blip (open): when the hold's reply is lost and the release fails too (Redis away
  for a moment), nothing retries the release: every process refuses the conversation's sends
  (UNAVAILABLE "being closed") for the hold's 120 s, though no close is under way.
- Redis loss: a message's entry in its conversation's in-flight set is not rebuilt from the log,
  and the settlement's touch (ZADD XX) never puts it back, so after a Redis loss a close in
  another process publishes while that message is still unsettled, and it lands after the close.
- Open-conversation quota (open): a durable start keeps only the ingress's expiring reservation
  until the sessions worker folds it; with the worker more than 120 s behind (stopped for
  `switchboard replay`, catching up after an outage) every place expires and the tenant starts
  as many conversations as it likes.
- Knowledge quota: a pure replacement is refused while the tenant is at or past its quota (the
  quota was lowered, or concurrent upserts passed it), though README says a replacement does not
  count.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from switchboard.v1 import chat_pb2, chat_pb2_grpc, events_pb2, knowledge_pb2

from schemas import hotview as hv
from services.ingress import _validation as v
from services.ingress._hotview import IngressHotView
from services.ingress._knowledge import KnowledgeService
from services.ingress._live import LiveHub
from services.ingress._producer import EventProducer
from services.ingress._writes import ConversationWrites
from services.kafka_topics import ensure_topics
from services.settings import Settings
from tests.conftest import System, eventually
from tests.integration.test_ingress_guarantees import message, start
from tests.integration.test_ingress_review import stub_read

pytestmark = pytest.mark.integration


def _blocked_in_read(sync: redis.Redis, client_id: int) -> bool:
    """Whether Redis has the client blocked (flag `b`), from a synchronous connection."""
    line: Any = sync.execute_command("CLIENT", "LIST", "ID", client_id)
    text = line.decode() if isinstance(line, bytes) else str(line)
    flags = next((f.split("=", 1)[1] for f in text.split() if f.startswith("flags=")), "")
    return "b" in flags


def _text(entry_id: Any) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


@pytest.mark.timeout(60)
async def test_a_call_joining_while_its_reader_returns_data_gets_every_entry_after_its_cursor(
    local_stack: Settings,
) -> None:
    """Two StreamConversation calls on one conversation at different cursors (the hub's own
    promise). The first follows from the end; the second joins from the beginning in the moment
    the reader's XREAD has returned a new entry and the event loop has not run the reader yet (a
    busy ingress). The reader then hands the second call that reply's new entry and moves its
    position past the three entries it never read for it."""
    s = local_stack
    key = hv.live_stream_key("review", uuid.uuid4().hex)
    sync = redis.Redis.from_url(s.redis_url)
    control = aioredis.Redis.from_url(s.redis_url)
    hub = LiveHub(s.redis_url, control, per_reader=4, block_ms=60_000)
    try:
        old = [_text(sync.xadd(key, {"k": str(i)})) for i in range(3)]
        first = hub.subscribe({key: old[-1]})
        reader = hub._readers[0]
        await eventually(
            lambda: asyncio.sleep(0, reader._client_id),
            lambda cid: cid is not None and _blocked_in_read(sync, cid),
            within_s=10,
            what="the reader blocked in XREAD",
        )
        client_id = reader._client_id
        assert client_id is not None
        # From here to the await below the event loop does not run: a new event arrives, Redis
        # answers the blocked XREAD, and a second call joins from the beginning.
        new = _text(sync.xadd(key, {"k": "3"}))
        deadline = time.monotonic() + 10
        while _blocked_in_read(sync, client_id) and time.monotonic() < deadline:
            pass  # Redis answers a blocked client right after the XADD (no await: loop held)
        second = hub.subscribe({key: "0-0"})
        got: list[str] = []
        while len(got) < 4:
            try:
                batch = await asyncio.wait_for(second.next(), timeout=5)
            except TimeoutError:
                break  # nothing more comes: what it got is all it will get
            got += [entry_id.decode() for name, entries in batch if name == key for entry_id, _ in entries]
        assert got == [*old, new]
        assert [e[0].decode() for _, es in await first.next() for e in es] == [new]
    finally:
        await hub.close()
        await control.aclose()
        sync.close()


class _HeldUnblock:
    """The hub's control connection, whose CLIENT UNBLOCK reply is handled late (a busy event
    loop runs the reader's callback first): the unblock itself reaches Redis at once."""

    def __init__(self, real: aioredis.Redis) -> None:
        self.real = real
        self.let_go = asyncio.Event()
        self.sent = 0

    async def client_unblock(self, client_id: int) -> bool:
        result = bool(await self.real.client_unblock(client_id))
        self.sent += 1
        await self.let_go.wait()
        return result


@pytest.mark.timeout(60)
async def test_a_call_joining_while_a_wake_is_in_flight_is_read_at_once(local_stack: Settings) -> None:
    """Under a flood of opens, calls join a reader while the previous join's CLIENT UNBLOCK is on
    its way back. The reader, unblocked, re-reads with the calls it had then; the later call's
    wake finds `_waking` not done and starts nothing, and the running one returns because the
    generation moved. The later call is read only when the reader's XREAD times out (block_ms:
    5 s in the ingress, 60 s here)."""
    s = local_stack
    sync = redis.Redis.from_url(s.redis_url)
    real = aioredis.Redis.from_url(s.redis_url)
    control = _HeldUnblock(real)
    hub = LiveHub(s.redis_url, control, per_reader=4, block_ms=60_000)  # type: ignore[arg-type]
    quiet, second_key, third_key = (hv.live_stream_key("review", uuid.uuid4().hex) for _ in range(3))
    waiting = _text(sync.xadd(third_key, {"k": "waiting"}))
    try:
        hub.subscribe({quiet: "0-0"})
        reader = hub._readers[0]

        async def blocked_at(generation: int) -> bool:
            cid = reader._client_id
            return reader._generation > generation and cid is not None and _blocked_in_read(sync, cid)

        await eventually(lambda: blocked_at(-1), bool, within_s=10, what="the reader blocked")
        generation = reader._generation
        hub.subscribe({second_key: "0-0"})  # its wake unblocks the reader; the reply is held
        await eventually(lambda: blocked_at(generation), bool, within_s=10, what="the reader blocked again")
        assert control.sent == 1
        third = hub.subscribe({third_key: "0-0"})
        batch = await asyncio.wait_for(third.next(), timeout=5)
        assert [_text(e[0]) for _, entries in batch for e in entries] == [waiting]
    finally:
        control.let_go.set()
        await hub.close()
        await real.aclose()
        sync.close()


@pytest.mark.timeout(60)
async def test_a_close_that_gave_up_does_not_release_another_processes_close(local_stack: Settings) -> None:
    """Process A's close of c gives up (its wait for other processes' messages timed out, or Kafka
    refused the close): `_close` drops A's close claim, then calls `release_close`. In between,
    a retried close in process B claims the close and holds c (`_wait_in_flight`). A's release
    then deletes B's hold: a send of c in process C is claimed while B publishes its close, so it
    can be acknowledged and land after the close in the log (dropped by the fold), exactly what
    7b7fb1a set out to prevent."""
    s = local_stack
    r = aioredis.Redis.from_url(s.redis_url)
    a, b, c = (IngressHotView(r, s.idempotency_ttl_s) for _ in range(3))
    tenant, conversation = "review", uuid.uuid4().hex
    try:
        # B's close holds the conversation; nothing of other processes is in flight.
        assert await b.hold_for_close(tenant, conversation, b"pending:b-close-attempt") == 0
        # A's failed close releases what it takes for its own hold.
        await a.release_close(tenant, conversation, b"pending:a-close-attempt")
        # Process C: a send of the conversation must still be refused while B's close is on.
        (claim,) = await c.claim_many([(tenant, conversation, "m1")], 0, unless_closed=True)
        assert claim.closing and not claim.claimed, claim
    finally:
        await r.aclose()


@pytest.mark.timeout(120)
async def test_a_close_cut_by_a_redis_blip_does_not_refuse_sends_for_the_holds_lifetime(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    """Process A closes c. Redis executes the hold (HSET closing = now + 120 s) but the connection
    drops before its reply; `_close` then drops its claim (retried in the background until Redis
    takes it) and releases the hold once, suppressing the error (Redis is still away). Redis is
    back a moment later, yet process B refuses every send of c as "being closed" until the hold
    expires two minutes later, although no close is under way and none will publish."""
    s = system.settings
    target = await start(stub, tenant)
    r = aioredis.Redis.from_url(s.redis_url)
    producers = [EventProducer(s), EventProducer(s)]
    for p in producers:
        await p.start()

    hot_a = IngressHotView(r, s.idempotency_ttl_s)
    a = ConversationWrites(s, producers[0], hot_a, stub_read)
    b = ConversationWrites(s, producers[1], IngressHotView(r, s.idempotency_ttl_s), stub_read)
    real_hold, real_release = hot_a.hold_for_close, hot_a.release_close
    blips = {"hold": 1, "release": 1}

    async def hold_for_close(tenant_id: str, conversation_id: str, owner: bytes) -> int:
        others = await real_hold(tenant_id, conversation_id, owner)
        if blips["hold"]:
            blips["hold"] -= 1
            raise RedisConnectionError("Connection reset by peer (after Redis ran the hold)")
        return others

    async def release_close(tenant_id: str, conversation_id: str, owner: bytes) -> None:
        if blips["release"]:
            blips["release"] -= 1
            raise RedisConnectionError("Error 111 connecting (Redis still away)")
        await real_release(tenant_id, conversation_id, owner)

    hot_a.hold_for_close = hold_for_close  # type: ignore[method-assign]
    hot_a.release_close = release_close  # type: ignore[method-assign]
    try:
        with pytest.raises(RedisConnectionError):
            await a.close_conversation(
                chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=target)
            )
        n = 0

        async def send() -> object:
            nonlocal n
            n += 1
            (outcome,) = await b.accept_messages([message(tenant, target, f"after-{n}")])
            return outcome

        sent = await eventually(
            send,
            lambda o: isinstance(o, chat_pb2.SendMessageResponse),
            within_s=15,
            what="a send accepted once Redis is back",
        )
        assert not sent.duplicate  # type: ignore[attr-defined]
    finally:
        for p in producers:
            await p.stop()
        await r.aclose()


@pytest.mark.timeout(60)
async def test_a_message_still_in_flight_when_redis_lost_data_is_waited_for_by_a_close(
    local_stack: Settings,
) -> None:
    """Process B claimed m1 and handed it to a slow Kafka (its settlement touches the claim every
    40 s). Redis loses its data; the sessions worker rebuilds states and claims from the log, but
    m1 is not in the log yet, and in-flight sets are not in the log at all. Once the hot view is
    ready again, process A's close holds the conversation and sees nothing in flight: it
    publishes, and m1, acknowledged to its client afterwards, lands after the close and is dropped
    by the fold. B still knows m1 is unsettled and touches it, but the touch only refreshes
    members that are there. (The loss is played by deleting this conversation's keys, as a
    FLUSHALL would, without disturbing other tests on the same Redis.)"""
    s = local_stack
    r = aioredis.Redis.from_url(s.redis_url)
    a, b = (IngressHotView(r, s.idempotency_ttl_s) for _ in range(2))
    tenant, conversation = "review", uuid.uuid4().hex
    key = (tenant, conversation, "m1")
    try:
        (claim,) = await b.claim_many([key], 0, unless_closed=True)
        assert claim.claimed and claim.tracked
        held = claim.held(key)
        await r.delete(
            hv.conversation_key(tenant, conversation),
            hv.idempotency_key(*key),
            hv.inflight_key(tenant, conversation),
        )
        # B's settlement: Kafka has not answered m1 yet, so its claim is kept alive.
        await b.touch_claims([held])
        assert await a.hold_for_close(tenant, conversation, b"pending:a-close-attempt") == 1, (
            "the close does not wait for m1"
        )
    finally:
        await r.delete(hv.conversation_key(tenant, conversation), hv.inflight_key(tenant, conversation))
        await r.aclose()


@pytest.mark.timeout(60)
async def test_replacing_a_document_is_not_refused_by_the_document_quota(local_stack: Settings) -> None:
    """README (Security → Quotas): "A replacement does not count." A tenant with 3 documents
    whose quota is lowered to 2 (`switchboard tenants update T --max-knowledge-documents 2`), or
    that passed it with concurrent upserts (documented), cannot even update one of its documents:
    RESOURCE_EXHAUSTED "would have 3", though the upsert adds nothing."""
    settings = local_stack.model_copy(update={"max_knowledge_documents": 2})
    r = aioredis.Redis.from_url(settings.redis_url)
    tenant = f"t{uuid.uuid4().hex[:12]}"
    service = KnowledgeService(settings, r)
    try:
        await r.hset(hv.documents_key(tenant), mapping={f"d{i}": b"x" for i in range(3)})
        replacement = knowledge_pb2.UpsertDocumentsRequest(
            tenant_id=tenant, documents=[knowledge_pb2.Document(document_id="d0", title="t", body="b")]
        )
        try:
            await service._check_quota(replacement)
        except v.RequestRejected as exc:
            pytest.fail(f"a replacement was refused by the quota: {exc}")
    finally:
        await r.delete(hv.documents_key(tenant))
        await r.aclose()


@pytest.mark.timeout(120)
async def test_a_durable_start_keeps_its_place_among_the_open_conversations(
    system: System, tenant: str
) -> None:
    """README (Quotas): "A reservation whose start never lands expires after 120 s." A start that
    did land expires the same way while the sessions worker has not folded it: the worker is
    stopped for `switchboard replay --target sessions` (it must be) or catching up. Here the
    ingress writes to a topic no worker folds, which is the same as a worker that is behind:
    the start is acknowledged, and its place is still an expiring reservation, so two minutes
    later the tenant (quota 1) may start another, and another."""
    s = system.settings.model_copy(
        update={"conversation_topic": f"review-unfolded-{uuid.uuid4().hex[:8]}", "max_open_conversations": 1}
    )
    await ensure_topics(s)
    r = aioredis.Redis.from_url(s.redis_url)
    producer = EventProducer(s)
    await producer.start()

    writes = ConversationWrites(s, producer, IngressHotView(r, s.idempotency_ttl_s), stub_read)
    try:
        started = await writes.start_conversation(
            chat_pb2.StartConversationRequest(
                tenant_id=tenant, channel=events_pb2.CHANNEL_WEB, customer_id="c"
            )
        )
        score = await r.zscore(hv.open_conversations_key(tenant), started.conversation_id)
        seconds, micros = await r.time()
        now_ms = seconds * 1000 + micros // 1000
        assert score is not None
        assert score == 0, f"the acknowledged start's place expires in {(score - now_ms) / 1000:.0f} s"
    finally:
        await producer.stop()
        await r.delete(hv.open_conversations_key(tenant))
        await r.aclose()
