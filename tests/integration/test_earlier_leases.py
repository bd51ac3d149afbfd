"""An ingress started again on the same address ends the leases of the earlier run's processes
that are gone.

What was seen (the ninth session's rehearsal, scenario b): after kill -9 of the whole `make run`
and `make run` again, a CloseConversation of a conversation whose message the killed process had
in flight answered UNAVAILABLE ("has messages still being written") for 107 s: a close waits for
the unsettled messages of a process whose lease only ran out (it may be stalled, not dead), until
their entries expire with the claim (120 s). No one was left to end those leases: the supervisor
that would have died with its children.
"""

from __future__ import annotations

import os
import signal
import uuid

import grpc
import psutil
import pytest
import redis.asyncio as aioredis
from switchboard.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from schemas import hotview as hv
from services.ingress._hotview import LEASE_S, IngressHotView, end_lease_if_stale, marker_prefix, new_lease_id
from services.ingress._supervisor import leases_file
from services.processes import Child, wait_for_ingress
from services.settings import Settings
from tests.conftest import eventually, start_conversation
from tests.integration.conftest import System

pytestmark = pytest.mark.integration

PORT = 25087 + int(os.environ.get("SWITCHBOARD_TEST_PORT_OFFSET", "0"))


def _lone_ingress(system: System, name: str) -> tuple[Child, Settings]:
    listen = f"127.0.0.1:{PORT}"
    env = {
        **system.env,
        "SWITCHBOARD_GRPC_LISTEN": listen,
        "SWITCHBOARD_INGRESS_PROCESSES": "1",
        "SWITCHBOARD_INGRESS_METRICS_LISTEN": "",
    }
    logs = system.settings.data_dir / "logs"
    settings = Settings(**{**system.settings.model_dump(), "grpc_listen": listen})
    return Child(name, ["ingress"], logs / f"{name}.log", env), settings


async def _lease(redis: aioredis.Redis, lease_id: str) -> int | None:
    value = await redis.hget(hv.INGRESS_LEASES_KEY, marker_prefix(lease_id))
    return int(value) if value is not None else None


@pytest.mark.timeout(180)
async def test_a_restarted_ingress_ends_the_lease_of_its_killed_predecessor(
    system: System, tenant: str, redis: aioredis.Redis
) -> None:
    first, settings = _lone_ingress(system, "lease-first")
    first.start()
    try:
        await wait_for_ingress(settings, first)
        (line,) = leases_file(settings).read_text().splitlines()
        lease_id, pid, _ = line.split()
        assert first.proc is not None and int(pid) == first.proc.pid
        async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            conversation_id = await start_conversation(
                stub, tenant, channel=events_pb2.CHANNEL_WEB, customer_id="c"
            )
        # A message it claimed and never wrote (killed mid-write), in the conversation's in-flight
        # set, as the killed process left it in the rehearsal.
        as_it = IngressHotView(redis, 3600, lease_id=lease_id)
        (claim,) = await as_it.claim_many(
            [(tenant, conversation_id, f"m-{uuid.uuid4().hex[:6]}")],
            settings.topic_partitions,
            unless_closed=True,
        )
        assert claim.claimed
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        assert not psutil.pid_exists(first.proc.pid) or psutil.Process(first.proc.pid).status() == "zombie"
        lease = await _lease(redis, lease_id)
        assert lease is not None and lease > 0, "killed: nothing ended its lease"
    finally:
        first.stop()
    second, _ = _lone_ingress(system, "lease-second")
    second.start()
    try:
        await wait_for_ingress(settings, second)
        # Ended once Redis has not seen it renewed for END_STALE_AFTER_S (before it runs out).
        ended = await eventually(
            lambda: _lease(redis, lease_id), lambda v: v is not None and v < 0, within_s=LEASE_S, what="ended"
        )
        assert ended is not None and ended < 0
        # So a close need not wait for that process's unsettled message.
        async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            closed = await eventually(
                lambda: stub.CloseConversation(
                    chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=conversation_id),
                    timeout=15,
                ),
                lambda c: c.status == chat_pb2.CONVERSATION_STATUS_CLOSED,
                within_s=15,
                what="the close",
            )
            assert closed.status == chat_pb2.CONVERSATION_STATUS_CLOSED
    finally:
        second.stop()


async def test_a_lease_renewed_lately_is_never_ended_as_stale_and_a_process_whose_lease_was_ended_stops(
    system: System, redis: aioredis.Redis
) -> None:
    """The third review's finding A: a clock step made a live process look gone to the pid check;
    its lease was ended and it went on writing. Now Redis decides (a live process renews every
    second), and a process that learns its lease was ended refuses writes for good."""
    alive_id = new_lease_id()
    alive = IngressHotView(redis, 3600, lease_id=alive_id)
    await alive.renew_lease()
    assert await end_lease_if_stale(redis, alive_id) == 0
    assert alive.lease_fresh()
    # Renewed last with 2 s: not renewed for longer than END_STALE_AFTER_S by the lease's own
    # arithmetic (expiry - LEASE_S), so it is ended...
    stalled_id = new_lease_id()
    stalled = IngressHotView(redis, 3600, lease_id=stalled_id)
    await stalled.renew_lease(2.0)
    assert stalled.lease_fresh()
    assert await end_lease_if_stale(redis, stalled_id) == 1
    assert (await _lease(redis, stalled_id) or 0) < 0
    # ...and when the process renews again it learns so and hands nothing claimed to Kafka.
    await stalled.renew_lease()
    assert not stalled.lease_fresh()
    assert await end_lease_if_stale(redis, new_lease_id()) == -1
