"""A start or a close claimed by an ingress process that died mid-write is taken over by its
retry within a lease, not after the claim's 120 s expiry; and a close a dead process began is
finished by the next process that meets its hold, so the conversation's sends are not refused for
120 s either.

What was seen (eighth session's closing note): after a kill -9 of an ingress process (or of
`switchboard run`) between a StartConversation's or CloseConversation's claim and its ack, the
retry was refused "is being started/closed by an earlier attempt" for 120 s (CLAIM_TTL_S), and
every SendMessage of a conversation whose close was under way was refused "is being closed" for
as long: the hold outlived its process. Messages were taken over within the lease already.

A dead process's close hold is never simply dropped (the review of the first version of this
fix): a process whose lease only ran out may be stalled, its close still to land, and a message
acknowledged meanwhile would land after that close, lost to the fold. So its close is finished
instead, and a late copy of it is a second close, which the fold ignores.

Each test claims as a dead process would (its own lease, ended as its supervisor ends it when it
sees the process exit, or left to run out) and, where the dead attempt's record did land, writes
that record to Kafka itself.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable

import grpc
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from switchboard.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from schemas import hotview as hv
from schemas.events import Event, encode_event, event_headers, event_key, new_event
from services.ingress._hotview import LEASE_S, IngressHotView, end_lease, marker_prefix, new_lease_id
from services.ingress._writes import DEAD_CLOSE_RESOLUTION, TAKEOVER_WAIT_S
from services.processes import wait_for_ingress
from services.settings import Settings
from tests.conftest import count, eventually, start_conversation, wait_for_count
from tests.integration.conftest import System

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
    """The hot view of an ingress process that claims and then dies: `die` ends its lease (as
    `switchboard ingress` ends a dead child's), or with `ran_out` waits until its short lease
    has run out (a process that stopped renewing: killed with its supervisor, or stalled)."""

    def __init__(self, redis: aioredis.Redis, *, ran_out: bool = False) -> None:
        self._redis = redis
        self._ran_out = ran_out
        self.lease_id = new_lease_id()
        self.hot = IngressHotView(redis, 3600, lease_id=self.lease_id)

    async def __aenter__(self) -> _DeadProcess:
        await self.hot.renew_lease(1.0 if self._ran_out else LEASE_S)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.die()

    async def die(self) -> None:
        if not self._ran_out:
            await end_lease(self._redis, self.lease_id)
            return
        prefix = marker_prefix(self.lease_id)

        async def ran_out() -> bool:
            seconds, micros = await self._redis.time()
            lease = await self._redis.hget(hv.INGRESS_LEASES_KEY, prefix)
            return lease is not None and int(lease) < seconds * 1000 + micros // 1000

        await eventually(ran_out, bool, within_s=10, what="the lease to run out")


async def _produce(settings: Settings, event: Event) -> tuple[int, int]:
    """Write one event as a dead process's late record would land: (partition, offset)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        meta = await producer.send_and_wait(
            settings.conversation_topic,
            encode_event(event),
            key=event_key(event),
            headers=event_headers(event),
        )
    finally:
        await producer.stop()
    return meta.partition, meta.offset


async def _folded(redis: aioredis.Redis, partition: int, offset: int) -> None:
    """Wait until the sessions worker has applied the log past `offset` of `partition`."""

    async def applied() -> int:
        value = await redis.hget(hv.APPLIED_KEY, str(partition))
        return int(value) if value is not None else -1

    await eventually(applied, lambda a: a > offset, within_s=30, what=f"the fold past {partition}:{offset}")


async def _claim_message(
    dead: _DeadProcess, settings: Settings, tenant: str, conversation_id: str, client_message_id: str
) -> None:
    """The dead process's claim of a customer message, as its write path makes it."""
    key = (tenant, conversation_id, client_message_id)
    (claim,) = await dead.hot.claim_many([key], settings.topic_partitions, unless_closed=True)
    assert claim.claimed


async def _started(stub: chat_pb2_grpc.ChatServiceStub, tenant: str) -> str:
    return await start_conversation(stub, tenant, channel=events_pb2.CHANNEL_WEB, customer_id="c")


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


@pytest.mark.parametrize(
    ("landed", "ran_out"),
    [(False, False), (True, False), (False, True)],
    ids=["not-landed", "landed", "ran-out"],
)
@pytest.mark.timeout(120)
async def test_the_retried_start_of_a_dead_process_is_answered_at_once(
    system: System,
    tenant: str,
    stub: chat_pb2_grpc.ChatServiceStub,
    redis: aioredis.Redis,
    landed: bool,
    ran_out: bool,
) -> None:
    settings = system.settings
    await wait_for_ingress(settings)
    conversation_id = f"dead-start-{uuid.uuid4().hex[:8]}"
    earlier = new_event(
        tenant,
        conversation_id,
        conversation_started=events_pb2.ConversationStarted(channel=events_pb2.CHANNEL_WEB, customer_id="c"),
    )
    async with _DeadProcess(redis, ran_out=ran_out) as dead:
        (claim,) = await dead.hot.claim_many(
            [(tenant, conversation_id, hv.START_CLAIM)], settings.topic_partitions
        )
        assert claim.claimed
        if landed:
            await _produce(settings, earlier)
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
    if ran_out:
        # The "dead" process had only stalled: its own start lands late, a second start, which
        # the fold ignores (the conversation stays as the retry started it, its message kept).
        late = new_event(
            tenant,
            conversation_id,
            conversation_started=events_pb2.ConversationStarted(customer_id="late-copy"),
        )
        await _folded(redis, *await _produce(settings, late))
        got = await stub.GetConversation(
            chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=conversation_id), timeout=10
        )
        assert got.customer_id == "c" and [m.text for m in got.messages] == ["hello"]
    print(f"\nretried start answered {took:.2f}s after its process died (landed={landed}, ran_out={ran_out})")


async def _held_by_a_dead_close(
    settings: Settings,
    redis: aioredis.Redis,
    tenant: str,
    conversation_id: str,
    *,
    landed: bool,
    ran_out: bool = False,
) -> float:
    """A dead process claims the close, holds the conversation (as CloseConversation does before
    it writes) and dies; with `landed` its close is in the log. Returns when it died."""
    async with _DeadProcess(redis, ran_out=ran_out) as dead:
        key = (tenant, conversation_id, hv.CLOSE_CLAIM)
        (claim,) = await dead.hot.claim_many([key], settings.topic_partitions)
        assert claim.claimed
        # Held once the messages acked before are settled (their settlement runs after the ack, as
        # CloseConversation's own wait allows for; seen unsettled on a loaded machine).
        await eventually(
            lambda: dead.hot.hold_for_close(tenant, conversation_id, claim.marker),
            lambda unsettled: unsettled == 0,
            within_s=15,
            what="the messages acked before the close settled",
        )
        if landed:
            await _produce(settings, _close_event(tenant, conversation_id, "dead"))
    return time.monotonic()


def _close_event(tenant: str, conversation_id: str, resolution: str) -> Event:
    return new_event(
        tenant,
        conversation_id,
        conversation_closed=events_pb2.ConversationClosed(
            resolution=resolution, closed_by=events_pb2.SENDER_CUSTOMER
        ),
    )


@pytest.mark.timeout(120)
async def test_a_dead_close_that_did_not_land_is_finished_and_nothing_is_acked_behind_it(
    system: System, tenant: str, stub: chat_pb2_grpc.ChatServiceStub, redis: aioredis.Redis
) -> None:
    ran_out = False
    settings = system.settings
    await wait_for_ingress(settings)
    conversation_id = await _started(stub, tenant)

    def send(cmid: str) -> Awaitable[object]:
        return _unary(
            stub.SendMessage(
                chat_pb2.SendMessageRequest(
                    tenant_id=tenant, conversation_id=conversation_id, client_message_id=cmid, text=cmid
                ),
                timeout=10,
            )
        )

    before = await send("before-the-close")
    assert isinstance(before, chat_pb2.SendMessageResponse), before
    died = await _held_by_a_dead_close(
        settings, redis, tenant, conversation_id, landed=False, ran_out=ran_out
    )
    refusals: list[str] = []

    def closed(r: object) -> bool:
        # Never acked: the dead process's close may still land (had it only stalled), and a
        # message acked now could land after it.
        assert isinstance(r, grpc.aio.AioRpcError), f"acked behind a close under way: {r}"
        assert r.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION), r
        refusals.append(r.details() or "")
        return r.code() == grpc.StatusCode.FAILED_PRECONDITION

    await eventually(lambda: send("behind-the-close"), closed, within_s=LEASE_S + 30, what="the close")
    took = time.monotonic() - died
    assert took < LEASE_S / 2, f"closed {took:.1f}s after the closing process died: {refusals[:3]}"
    got = await stub.GetConversation(
        chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=conversation_id), timeout=10
    )
    assert got.status == chat_pb2.CONVERSATION_STATUS_CLOSED
    assert got.resolution == DEAD_CLOSE_RESOLUTION
    assert [m.text for m in got.messages] == ["before-the-close"]
    # Had the process only stalled, its own close lands late: a second close, which the fold ignores.
    await _folded(redis, *await _produce(settings, _close_event(tenant, conversation_id, "late copy")))
    again = await stub.CloseConversation(
        chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=conversation_id), timeout=30
    )
    assert again.status == chat_pb2.CONVERSATION_STATUS_CLOSED
    assert again.resolution == DEAD_CLOSE_RESOLUTION
    assert [m.text for m in again.messages] == ["before-the-close"]
    print(
        f"\ndead close finished {took:.2f}s after its process died (ran_out={ran_out}, {len(refusals)} refusals)"
    )


@pytest.mark.timeout(120)
async def test_a_dead_close_that_landed_refuses_sends_as_closed(
    system: System, tenant: str, stub: chat_pb2_grpc.ChatServiceStub, redis: aioredis.Redis
) -> None:
    settings = system.settings
    await wait_for_ingress(settings)
    conversation_id = await _started(stub, tenant)
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


@pytest.mark.timeout(120)
async def test_the_close_of_a_process_whose_lease_only_ran_out_is_waited_for(
    system: System, tenant: str, stub: chat_pb2_grpc.ChatServiceStub, redis: aioredis.Redis
) -> None:
    """A process whose lease ran out may only be stalled, its close still to come (the second
    review's finding 1): its hold is not taken over nor its close finished for it; sends are
    refused until its close lands, and then refused as closed. Never acked in between."""
    settings = system.settings
    await wait_for_ingress(settings)
    conversation_id = await _started(stub, tenant)
    await _held_by_a_dead_close(settings, redis, tenant, conversation_id, landed=False, ran_out=True)
    request = chat_pb2.SendMessageRequest(
        tenant_id=tenant,
        conversation_id=conversation_id,
        client_message_id="behind-a-stalled-close",
        text="x",
    )
    close = chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=conversation_id)
    # Past the lease and the takeover's wait: still refused, and nothing closed it for the process.
    deadline = time.monotonic() + TAKEOVER_WAIT_S + 1
    while time.monotonic() < deadline:
        refused = await _unary(stub.SendMessage(request, timeout=10))
        assert isinstance(refused, grpc.aio.AioRpcError), f"acked behind a close under way: {refused}"
        assert refused.code() == grpc.StatusCode.UNAVAILABLE and "being closed" in (refused.details() or "")
        retried = await _unary(stub.CloseConversation(close, timeout=10))
        assert isinstance(retried, grpc.aio.AioRpcError), f"a close taken over from a live process: {retried}"
        assert retried.code() == grpc.StatusCode.UNAVAILABLE, retried
    # Its close lands (it was stalled): sends are refused as closed, with its resolution.
    await _folded(redis, *await _produce(settings, _close_event(tenant, conversation_id, "stalled one")))

    def refused_as_closed(r: object) -> bool:
        assert isinstance(r, grpc.aio.AioRpcError), f"acked behind the close: {r}"
        return r.code() == grpc.StatusCode.FAILED_PRECONDITION

    await eventually(
        lambda: _unary(stub.SendMessage(request, timeout=10)), refused_as_closed, within_s=10, what="closed"
    )
    got = await stub.CloseConversation(close, timeout=10)
    assert got.status == chat_pb2.CONVERSATION_STATUS_CLOSED and got.resolution == "stalled one"


@pytest.mark.timeout(120)
async def test_a_retry_of_the_dead_process_message_finishes_its_close(
    system: System, tenant: str, stub: chat_pb2_grpc.ChatServiceStub, redis: aioredis.Redis
) -> None:
    """The dead process had a message in flight and was closing the conversation; the client
    retries that very message (same id): it is answered as any send would be (the close is
    finished, then closed), not "being written by an earlier attempt" for the claim's 120 s."""
    settings = system.settings
    await wait_for_ingress(settings)
    conversation_id = await _started(stub, tenant)
    async with _DeadProcess(redis) as dead:
        await _claim_message(dead, settings, tenant, conversation_id, "in-flight")
        (close,) = await dead.hot.claim_many(
            [(tenant, conversation_id, hv.CLOSE_CLAIM)], settings.topic_partitions
        )
        assert close.claimed
        assert await dead.hot.hold_for_close(tenant, conversation_id, close.marker) == 0
    request = chat_pb2.SendMessageRequest(
        tenant_id=tenant, conversation_id=conversation_id, client_message_id="in-flight", text="x"
    )
    details: list[str] = []

    def closed(r: object) -> bool:
        assert isinstance(r, grpc.aio.AioRpcError), f"acked behind a close under way: {r}"
        details.append(r.details() or "")
        return r.code() == grpc.StatusCode.FAILED_PRECONDITION

    await eventually(
        lambda: _unary(stub.SendMessage(request, timeout=10)), closed, within_s=LEASE_S / 2, what="closed"
    )
    assert not any("earlier attempt" in d for d in details), details


@pytest.mark.parametrize("landed", [False, True], ids=["not-landed", "landed"])
@pytest.mark.timeout(120)
async def test_a_retried_message_of_a_dead_process_after_the_close_is_answered_by_the_log(
    system: System, tenant: str, stub: chat_pb2_grpc.ChatServiceStub, redis: aioredis.Redis, landed: bool
) -> None:
    """The dead process's message may have landed before the conversation was closed (by
    another process): its retry gets that message's ack (duplicate), not "closed" because the
    close was marked before the fold recorded the ack; one that never landed is "closed"."""
    settings = system.settings
    await wait_for_ingress(settings)
    conversation_id = await _started(stub, tenant)
    async with _DeadProcess(redis) as dead:
        await _claim_message(dead, settings, tenant, conversation_id, "mid-write")
        written = new_event(
            tenant,
            conversation_id,
            message_received=events_pb2.MessageReceived(client_message_id="mid-write", text="landed"),
        )
        if landed:
            await _produce(settings, written)
    closed = await stub.CloseConversation(
        chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=conversation_id), timeout=30
    )
    assert closed.status == chat_pb2.CONVERSATION_STATUS_CLOSED
    retried = await _unary(
        stub.SendMessage(
            chat_pb2.SendMessageRequest(
                tenant_id=tenant,
                conversation_id=conversation_id,
                client_message_id="mid-write",
                text="landed",
            ),
            timeout=10,
        )
    )
    if landed:
        assert isinstance(retried, chat_pb2.SendMessageResponse), retried
        assert retried.duplicate and retried.event_id == written.event_id
    else:
        assert (
            isinstance(retried, grpc.aio.AioRpcError)
            and retried.code() == grpc.StatusCode.FAILED_PRECONDITION
        )
