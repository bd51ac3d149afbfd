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
from collections.abc import AsyncIterator

import grpc
import psutil
import pytest
import redis.asyncio as aioredis
from switchboard.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from schemas import hotview as hv
from services.ingress._hotview import IngressHotView, marker_prefix
from services.ingress._supervisor import leases_file
from services.processes import Child, wait_for_ingress
from services.settings import Settings
from tests.conftest import eventually, start_conversation
from tests.integration.conftest import System

pytestmark = pytest.mark.integration

PORT = 25087 + int(os.environ.get("SWITCHBOARD_TEST_PORT_OFFSET", "0"))


@pytest.fixture
async def redis(system: System) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(system.settings.redis_url)
    yield client
    await client.aclose()


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
        ended = await _lease(redis, lease_id)
        assert ended is not None and ended < 0, f"the earlier process's lease was not ended: {ended}"
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
