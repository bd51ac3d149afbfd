"""A message claimed by an ingress process that died mid-write is written by the retry within a
lease, not after the claim's 120 s expiry.

Seen in the judges' rehearsal (finding 2): `kill -9` of `switchboard run` under load, `make run`
again: one message whose claim was taken but never produced was refused "is being written by an
earlier attempt; retry shortly" 285 times, for 120 s (CLAIM_TTL_S), before its retry was acked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable

import grpc
import psutil
import pytest
import redis.asyncio as aioredis
from switchboard.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from schemas import hotview as hv
from services.ingress._hotview import CLAIM_TTL_S, LEASE_S, IngressHotView
from services.ingress._supervisor import LEASE_ENV
from services.processes import wait_for_ingress
from tests.conftest import eventually, start_conversation
from tests.integration.conftest import System

pytestmark = pytest.mark.integration

# A process that renews its lease, claims one message as the ingress does, says so and waits to be
# killed: an ingress process killed between its claim and its produce.
_CLAIMER = textwrap.dedent(
    """
    import asyncio, sys
    import redis.asyncio as aioredis
    from services.ingress._hotview import IngressHotView

    async def main(url, partitions, tenant, conversation, cmid):
        redis = aioredis.Redis.from_url(url)
        hot = IngressHotView(redis, 3600)
        await hot.renew_lease()
        (claim,) = await hot.claim_many([(tenant, conversation, cmid)], int(partitions), unless_closed=True)
        print("claimed" if claim.claimed else "refused", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main(*sys.argv[1:]))
    """
)


async def _send(
    chat: chat_pb2_grpc.ChatServiceStub, request: chat_pb2.SendMessageRequest, refusals: list[str]
) -> chat_pb2.SendMessageResponse | None:
    """The ack, or None for an UNAVAILABLE (its details kept in `refusals`); nothing else."""
    try:
        return await chat.SendMessage(request, timeout=10)
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        refusals.append(err.details() or "")
        return None


@pytest.mark.timeout(120)
async def test_a_claim_of_a_killed_ingress_process_is_taken_over_within_the_lease(
    system: System, tenant: str
) -> None:
    settings = system.settings
    await wait_for_ingress(settings)
    async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        conversation_id = await start_conversation(
            chat, tenant, channel=events_pb2.CHANNEL_WEB, customer_id="c"
        )
        cmid = f"mid-write-{uuid.uuid4().hex[:8]}"
        claimer = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CLAIMER,
            settings.redis_url,
            str(settings.topic_partitions),
            tenant,
            conversation_id,
            cmid,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, **system.env},
        )
        try:
            assert claimer.stdout is not None
            line = await asyncio.wait_for(claimer.stdout.readline(), 60)
            assert line.strip() == b"claimed", line
        finally:
            claimer.send_signal(signal.SIGKILL)
            await claimer.wait()
        killed_at = time.monotonic()
        request = chat_pb2.SendMessageRequest(
            tenant_id=tenant, conversation_id=conversation_id, client_message_id=cmid, text="hello"
        )
        refusals: list[str] = []

        def send() -> Awaitable[chat_pb2.SendMessageResponse | None]:
            return _send(chat, request, refusals)

        # Right after the kill the dead process's lease still runs: the claim is honoured.
        assert await send() is None
        assert "being written by an earlier attempt" in refusals[0], refusals[0]
        ack = await eventually(send, lambda r: r is not None, within_s=LEASE_S + 20, what="the retry's ack")
        took = time.monotonic() - killed_at
        assert ack is not None and not ack.duplicate
        assert took < LEASE_S + 10 < CLAIM_TTL_S, f"acked {took:.1f}s after the kill"
        # Its retries from now on are duplicates of that ack, and the conversation has it once.
        again = await chat.SendMessage(request, timeout=10)
        assert again.duplicate and again.event_id == ack.event_id

        async def texts() -> list[str]:
            got = await chat.GetConversation(
                chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=conversation_id),
                timeout=10,
            )
            return [m.text for m in got.messages if m.sender == events_pb2.SENDER_CUSTOMER]

        assert await eventually(texts, lambda t: t == ["hello"], what="the message once") == ["hello"]
        print(f"\nretry acked {took:.1f}s after the claiming process was killed ({len(refusals)} refusals)")


@pytest.mark.timeout(120)
async def test_the_supervisor_ends_the_lease_of_an_ingress_process_that_died(
    system: System, tenant: str
) -> None:
    """`switchboard ingress` runs N processes; one killed mid-write (kill -9) is seen dead by its
    supervisor at once, which ends its lease: the retry is acked without waiting LEASE_S."""
    settings = system.settings
    await wait_for_ingress(settings)
    supervisor = system.children["ingress"].proc
    assert supervisor is not None
    victim = psutil.Process(supervisor.pid).children()[0]
    lease_id = victim.environ()[LEASE_ENV]
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
            chat = chat_pb2_grpc.ChatServiceStub(channel)
            conversation_id = await start_conversation(
                chat, tenant, channel=events_pb2.CHANNEL_WEB, customer_id="c"
            )
            cmid = f"mid-write-{uuid.uuid4().hex[:8]}"
            # The victim's claim, as it makes them (its marker prefix is its lease's).
            as_victim = IngressHotView(redis, 3600, lease_id=lease_id)
            key = (tenant, conversation_id, cmid)
            (claim,) = await as_victim.claim_many([key], settings.topic_partitions, unless_closed=True)
            assert claim.claimed
            victim.kill()
            killed_at = time.monotonic()
            request = chat_pb2.SendMessageRequest(
                tenant_id=tenant, conversation_id=conversation_id, client_message_id=cmid, text="hi"
            )
            ack = await eventually(
                lambda: _send(chat, request, []),
                lambda r: r is not None,
                within_s=LEASE_S + 20,
                what="the ack",
            )
            took = time.monotonic() - killed_at
            assert ack is not None and not ack.duplicate
            assert took < LEASE_S / 2, f"acked {took:.1f}s after the kill: the lease ran out by itself"
            print(
                f"\nretry acked {took:.2f}s after kill -9 of an ingress process (its lease ended by its supervisor)"
            )
            # The dead attempt's entry in the conversation's in-flight set stays behind; a close
            # need not wait for it (its process is dead for sure), where it used to wait out the
            # produce timeout and answer UNAVAILABLE for the entry's 120 s.
            closed = await chat.CloseConversation(
                chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=conversation_id),
                timeout=30,
            )
            assert closed.status == chat_pb2.CONVERSATION_STATUS_CLOSED
    finally:
        await redis.aclose()
    await wait_for_ingress(settings)


async def test_only_claims_of_processes_whose_lease_ran_out_are_taken_over(
    system: System, tenant: str
) -> None:
    redis = aioredis.Redis.from_url(system.settings.redis_url)
    # Three processes' views (each its own marker prefix, so its own lease).
    dead, alive, retrier = (IngressHotView(redis, 3600) for _ in range(3))
    partitions = system.settings.topic_partitions
    try:
        await alive.renew_lease()
        await retrier.renew_lease()
        await dead.renew_lease(3)  # a process whose last renewal gave it 3 s more
        conversation = f"c-{uuid.uuid4().hex[:8]}"
        await redis.hset(hv.conversation_key(tenant, conversation), hv.F_CREATED_NS, 1)
        dead_key, alive_key, unknown_key = (
            (tenant, conversation, "dead"),
            (tenant, conversation, "alive"),
            (tenant, conversation, "unknown"),
        )
        (d,) = await dead.claim_many([dead_key], partitions, unless_closed=True)
        (a,) = await alive.claim_many([alive_key], partitions, unless_closed=True)
        start_key = (tenant, conversation, hv.START_CLAIM)
        (ds,) = await dead.claim_many([start_key], partitions)  # a start (or close) claim
        assert d.claimed and a.claimed and ds.claimed
        assert (await retrier.claim_many([start_key], partitions))[0].in_flight
        # A claim whose owner has no lease at all (Redis lost the leases hash) is not taken for dead.
        await redis.set(hv.idempotency_key(*unknown_key), hv.CLAIM_PENDING + b":" + b"f" * 28, ex=CLAIM_TTL_S)

        first = await retrier.claim_many([dead_key, alive_key, unknown_key], partitions, unless_closed=True)
        assert [(c.in_flight, c.orphaned) for c in first] == [(True, False)] * 3
        orphaned = await eventually(
            lambda: retrier.claim_many([dead_key, alive_key, unknown_key], partitions, unless_closed=True),
            lambda claims: claims[0].orphaned,
            within_s=10,
            what="the dead process's claim seen orphaned",
        )
        # Orphaned is not taken: only a caller that made sure the dead attempt's record, had it
        # landed, is folded (ConversationWrites._take_over) asks for that.
        assert orphaned[0].in_flight and not orphaned[0].claimed
        assert [(c.in_flight, c.orphaned) for c in orphaned[1:]] == [(True, False)] * 2
        taken = await retrier.claim_many(
            [dead_key, alive_key, unknown_key], partitions, unless_closed=True, take_over=True
        )
        assert taken[0].claimed and [(c.in_flight, c.orphaned) for c in taken[1:]] == [(True, False)] * 2
        # Starts and closes are never taken over (a dead process's close may be in the log).
        assert (await retrier.claim_many([start_key], partitions))[0].in_flight
        # A close waits for the unsettled messages of other processes, also of one whose lease
        # only ran out (it may be stalled, not dead)...
        assert await retrier.hold_for_close(tenant, conversation, b"pending:close-attempt") == 2
        await retrier.release_close(tenant, conversation, b"pending:close-attempt")
        # The dead attempt's late drop (were it only stalled) leaves the new claim alone.
        await dead.settle_many([(d.held(dead_key), None)])
        assert (await redis.get(hv.idempotency_key(*dead_key))) == taken[0].marker
        # A process that stops ends its lease: its claims are orphaned at once, and a close no
        # longer waits for its messages; its late renewal does not bring it back.
        await alive.renew_lease(0)
        await alive.renew_lease()
        assert await retrier.hold_for_close(tenant, conversation, b"pending:close-attempt") == 0
        await retrier.release_close(tenant, conversation, b"pending:close-attempt")
        (now,) = await retrier.claim_many([alive_key], partitions, unless_closed=True)
        assert now.orphaned
    finally:
        await redis.aclose()
