"""`switchboard ingress` as N processes on one port (SO_REUSEPORT) under a supervisor, on the real
stack: connections reach every process, a process that dies is replaced, and a process told to stop
(SIGTERM) finishes its in-flight calls while new connections go to the others."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import psutil
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from schemas import hotview as hv
from services import stack
from services.processes import wait_for_ingress
from tests.conftest import free_port
from tests.integration.conftest import System, eventually, start_conversation
from tests.unit.test_child_dies_with_parent import assert_children_die_with

pytestmark = pytest.mark.integration

PROCESSES = 2  # SWITCHBOARD_INGRESS_PROCESSES of the test system (tests/conftest.py)


def servers(system: System) -> list[psutil.Process]:
    """The ingress processes under the supervisor that the test system started."""
    proc = system.children["ingress"].proc
    assert proc is not None
    return [
        p
        for p in psutil.Process(proc.pid).children()
        if p.is_running()
        and p.status() != psutil.STATUS_ZOMBIE
        and "services.ingress" in " ".join(p.cmdline())
    ]


def port(system: System) -> int:
    return int(system.settings.grpc_listen.rsplit(":", 1)[1])


def listening(p: psutil.Process, on: int) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == on for c in p.net_connections("tcp"))
    except psutil.Error:
        return False


def peers(p: psutil.Process, on: int) -> set[int]:
    """Client ports of the connections this server process holds on the ingress port."""
    try:
        return {
            c.raddr.port
            for c in p.net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == on and c.raddr
        }
    except psutil.Error:
        return set()


async def all_serving(system: System) -> list[psutil.Process]:
    found = await eventually(
        lambda: asyncio.to_thread(lambda: [p for p in servers(system) if listening(p, port(system))]),
        lambda ps: len(ps) == PROCESSES,
        what=f"{PROCESSES} ingress processes listening",
    )
    await wait_for_ingress(system.settings)
    return found


def separate_channel(system: System) -> grpc.aio.Channel:
    # A channel of its own connection (no shared subchannel), as separate clients would have.
    return grpc.aio.insecure_channel(
        system.settings.grpc_listen, options=[("grpc.use_local_subchannel_pool", 1)]
    )


@pytest.fixture
async def channels(system: System) -> AsyncIterator[list[grpc.aio.Channel]]:
    opened = [separate_channel(system) for _ in range(12)]
    try:
        yield opened
    finally:
        for channel in opened:
            await channel.close()


def message(tenant: str, conversation_id: str, cmid: str) -> chat_pb2.SendMessageRequest:
    return chat_pb2.SendMessageRequest(
        tenant_id=tenant, conversation_id=conversation_id, client_message_id=cmid, text="hello"
    )


async def test_connections_are_spread_over_the_processes(
    system: System, channels: list[grpc.aio.Channel], tenant: str
) -> None:
    procs = await all_serving(system)
    stubs = [chat_pb2_grpc.ChatServiceStub(c) for c in channels]
    conversation_id = await start_conversation(stubs[0], tenant)
    acks = await asyncio.gather(
        *(s.SendMessage(message(tenant, conversation_id, f"m{i}")) for i, s in enumerate(stubs))
    )
    assert not any(a.duplicate for a in acks)
    holding = [len(await asyncio.to_thread(peers, p, port(system))) for p in procs]
    assert all(n > 0 for n in holding), f"connections per ingress process: {holding}"
    # The same message through another process is still a duplicate (claims live in Redis).
    again = await asyncio.gather(*(s.SendMessage(message(tenant, conversation_id, "m0")) for s in stubs))
    assert all(a.duplicate and a.event_id == acks[0].event_id for a in again)


@pytest.mark.timeout(180)
async def test_a_process_that_dies_is_replaced_and_the_others_keep_serving(
    system: System, tenant: str
) -> None:
    procs = await all_serving(system)
    victim = procs[0]
    victim.send_signal(signal.SIGKILL)
    await asyncio.to_thread(victim.wait, 10)
    # Meanwhile new connections reach the survivor.
    async with separate_channel(system) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        conversation_id = await start_conversation(stub, tenant)
        ack = await stub.SendMessage(message(tenant, conversation_id, "m1"))
        assert not ack.duplicate
    replaced = await all_serving(system)
    assert victim.pid not in {p.pid for p in replaced}
    assert system.children["ingress"].alive


@pytest.mark.timeout(240)
async def test_sigterm_drains_in_flight_calls_and_new_calls_go_to_the_others(
    system: System, tenant: str
) -> None:
    await all_serving(system)
    async with separate_channel(system) as setup:
        conversation_id = await start_conversation(chat_pb2_grpc.ChatServiceStub(setup), tenant)
        await chat_pb2_grpc.ChatServiceStub(setup).SendMessage(message(tenant, conversation_id, "warm"))
    kafka = psutil.Process((await stack.status(system.settings))["kafka"]["pid"])
    first = separate_channel(system)
    second = separate_channel(system)
    try:
        stub = chat_pb2_grpc.ChatServiceStub(first)
        await stub.SendMessage(message(tenant, conversation_id, "warm"))  # connected
        mine = {
            c.laddr.port
            for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == port(system)
        }
        serving = [p for p in servers(system) if peers(p, port(system)) & mine]
        assert len(serving) == 1
        draining = serving[0]
        kafka.send_signal(signal.SIGSTOP)  # the next write stays in flight
        try:
            in_flight = asyncio.ensure_future(
                stub.SendMessage(message(tenant, conversation_id, "m1"), timeout=60)
            )
            await asyncio.sleep(0.3)  # the call reached the server (nothing to await on the server side)
            assert not in_flight.done()
            draining.send_signal(signal.SIGTERM)
            await eventually(
                lambda: asyncio.to_thread(listening, draining, port(system)),
                lambda up: not up,
                within_s=10,
                what="the stopping process closes its listener",
            )
            assert draining.is_running(), "it must wait for its in-flight call"
            later = asyncio.ensure_future(
                chat_pb2_grpc.ChatServiceStub(second).SendMessage(
                    message(tenant, conversation_id, "m2"), timeout=60
                )
            )
            await asyncio.sleep(0.3)
        finally:
            kafka.send_signal(signal.SIGCONT)
        ack1 = await in_flight
        ack2 = await later
        assert not ack1.duplicate and not ack2.duplicate
        await asyncio.to_thread(draining.wait, 30)
    finally:
        await first.close()
        await second.close()
    await all_serving(system)


async def test_every_process_answers_health_from_the_hot_view_at_once(system: System) -> None:
    # Health used to follow a 0.5 s poll per process: right after the hot view changed, a new
    # connection could reach a process that still said SERVING (or NOT_SERVING) while another
    # said the opposite. Check now reads the readiness itself.
    await all_serving(system)
    redis = aioredis.Redis.from_url(system.settings.redis_url)
    channels = [separate_channel(system) for _ in range(8)]
    ready = await redis.hgetall(hv.READY_KEY)
    partition = sorted(ready)[0]

    async def statuses() -> set[int]:
        replies = await asyncio.gather(
            *(
                health_pb2_grpc.HealthStub(c).Check(health_pb2.HealthCheckRequest(service=""))
                for c in channels
            )
        )
        return {r.status for r in replies}

    try:
        assert await statuses() == {health_pb2.HealthCheckResponse.SERVING}
        await redis.hdel(hv.READY_KEY, partition)  # what a Redis that lost data looks like
        assert await statuses() == {health_pb2.HealthCheckResponse.NOT_SERVING}
    finally:
        await redis.hset(hv.READY_KEY, partition, ready[partition])
        await redis.aclose()
    assert await statuses() == {health_pb2.HealthCheckResponse.SERVING}
    for channel in channels:
        await channel.close()


@pytest.mark.timeout(120)
async def test_a_killed_supervisor_takes_its_ingress_processes(
    system: System, test_env: dict[str, str], tmp_path: Path
) -> None:
    """A second `switchboard ingress` (on ports of its own) killed with -9: its processes go too."""
    ports = [free_port() for _ in range(2)]
    env = {
        **os.environ,
        **test_env,
        "SWITCHBOARD_INGRESS_PROCESSES": "2",
        "SWITCHBOARD_GRPC_LISTEN": f"127.0.0.1:{ports[0]}",
        "SWITCHBOARD_INGRESS_METRICS_LISTEN": f"127.0.0.1:{ports[1]}",
    }
    env.pop("SWITCHBOARD_DIE_WITH_PARENT", None)
    log = tmp_path / "ingress.log"

    def start_and_kill() -> None:
        with log.open("wb") as out:
            supervisor = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "ingress"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        assert_children_die_with(supervisor, 2, log)

    await asyncio.to_thread(start_and_kill)
