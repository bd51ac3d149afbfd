"""A stopping ingress process (SIGTERM) ends its long-lived streams at once instead of holding them
for its whole grace and then dropping them: a StreamConversation ends with UNAVAILABLE (its client
follows again from its last cursor, on another process); a SendMessages stream reads no more, still
answers the message it had in flight, then ends with UNAVAILABLE, and the client's next stream (on
another process) gets the same ack for a resent message and writes the rest."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from services import stack
from services.ingress import IngressServer
from services.processes import wait_for_ingress
from tests.integration.conftest import System, eventually, start_conversation
from tests.integration.test_ingress_guarantees import ingress_settings
from tests.integration.test_ingress_processes import (
    all_serving,
    listening,
    message,
    peers,
    port,
    separate_channel,
    servers,
)

pytestmark = pytest.mark.integration


def _my_ports(system: System) -> set[int]:
    """Local ports of this test process's connections to the ingress."""
    return {
        c.laddr.port
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port == port(system)
    }


def _serving_process(system: System, before: set[int]) -> psutil.Process:
    """The ingress process serving the connections opened since `before` (channels of earlier
    tests in this worker, such as the session's stub, may be served by the other one)."""
    mine = _my_ports(system) - before
    serving = [p for p in servers(system) if peers(p, port(system)) & mine]
    assert len(serving) == 1, serving
    return serving[0]


async def _status_of(call: grpc.aio.Call) -> tuple[list[object], grpc.StatusCode, str]:
    """What the call still delivers, then how it ended."""
    got: list[object] = []
    while True:
        try:
            item = await call.read()
        except grpc.aio.AioRpcError as exc:
            return got, exc.code(), exc.details() or ""
        if item is grpc.aio.EOF:
            return got, await call.code(), await call.details()
        got.append(item)


async def test_sigterm_ends_live_and_idle_streams_at_once_and_answers_what_was_in_flight(
    system: System, tenant: str
) -> None:
    await all_serving(system)
    kafka = psutil.Process((await stack.status(system.settings))["kafka"]["pid"])
    before = _my_ports(system)
    channel = separate_channel(system)
    other = separate_channel(system)
    try:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        conversation_id = await start_conversation(stub, tenant)
        live = stub.StreamConversation(
            chat_pb2.StreamConversationRequest(tenant_id=tenant, conversation_id=conversation_id)
        )
        first = await asyncio.wait_for(live.read(), 30)  # the replay reached us: the call is open
        assert first is not grpc.aio.EOF
        queue: asyncio.Queue[chat_pb2.SendMessageRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[chat_pb2.SendMessageRequest]:
            while (item := await queue.get()) is not None:
                yield item

        sending = stub.SendMessages(requests())
        await queue.put(message(tenant, conversation_id, "s1"))
        ack1 = await asyncio.wait_for(sending.read(), 30)
        assert ack1.client_message_id == "s1" and not ack1.error_code
        stopping = _serving_process(system, before)
        kafka.send_signal(signal.SIGSTOP)  # s2 stays in flight through the drain
        try:
            await queue.put(message(tenant, conversation_id, "s2"))
            await asyncio.sleep(0.3)  # s2 reached the server (nothing to await on the client side)
            started = time.monotonic()
            stopping.send_signal(signal.SIGTERM)
            _, live_code, live_details = await asyncio.wait_for(_status_of(live), 30)
            took = time.monotonic() - started
            assert live_code == grpc.StatusCode.UNAVAILABLE, (live_code, live_details)
            assert "stopping" in live_details
            assert took < 3.0, f"the live stream ended {took:.1f}s after SIGTERM"
            await eventually(
                lambda: asyncio.to_thread(listening, stopping, port(system)),
                lambda up: not up,
                within_s=10,
                what="the stopping process closes its listener",
            )
            assert not sending.done(), "s2 is in flight: the stream must wait for its answer"
        finally:
            kafka.send_signal(signal.SIGCONT)
        answers, send_code, send_details = await asyncio.wait_for(_status_of(sending), 60)
        assert [(a.client_message_id, a.error_code) for a in answers] == [("s2", 0)]  # type: ignore[attr-defined]
        assert send_code == grpc.StatusCode.UNAVAILABLE, (send_code, send_details)
        assert "stopping" in send_details
        await asyncio.to_thread(stopping.wait, 30)

        # The client goes on on a new stream: a resent message gets its first ack, a new one is written.
        async def resent() -> AsyncIterator[chat_pb2.SendMessageRequest]:
            yield message(tenant, conversation_id, "s2")
            yield message(tenant, conversation_id, "s3")

        again = [a async for a in chat_pb2_grpc.ChatServiceStub(other).SendMessages(resent())]
        assert [(a.client_message_id, a.duplicate, a.error_code) for a in again] == [
            ("s2", True, 0),
            ("s3", False, 0),
        ]
        assert again[0].offset == answers[0].offset  # type: ignore[attr-defined]
        await queue.put(None)
    finally:
        await channel.close()
        await other.close()
    await all_serving(system)


# In-process ingress servers (not the test system's supervised ones): the drain is driven directly.


async def _ended(call: grpc.aio.Call, within_s: float) -> tuple[list[object], grpc.StatusCode, str]:
    return await asyncio.wait_for(_status_of(call), within_s)


async def test_a_stream_begun_once_the_drain_began_ends_unavailable_at_once(
    system: System, tenant: str
) -> None:
    """The drain makes every SendMessages stream stop, also one whose handler starts after it (gRPC
    starts handlers of calls it accepted before its own shutdown an iteration or two later)."""
    server = IngressServer(ingress_settings(system.settings))
    await server.start()
    stopped = False
    try:
        await wait_for_ingress(server.settings)
        async with grpc.aio.insecure_channel(server.settings.grpc_listen) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            conversation_id = await start_conversation(stub, tenant)
            server.chat.drain()  # what stop() does before the server's own shutdown

            async def one() -> AsyncIterator[chat_pb2.SendMessageRequest]:
                # The client keeps its side open and writes nothing: a grpc.aio client whose write
                # meets the server's final status reports INTERNAL "Internal error from Core"
                # instead of that status (grpc/grpc#36066; CI12 saw it here).
                await asyncio.Event().wait()
                yield message(tenant, conversation_id, "never sent")

            answers, code, details = await _ended(stub.SendMessages(one()), 5)
            assert (answers, code) == ([], grpc.StatusCode.UNAVAILABLE), (answers, code, details)
            assert "stopping" in details
            started = time.monotonic()
            await server.stop(grace=10)
            stopped = True
            assert time.monotonic() - started < 5, "nothing held the stop"
    finally:
        if not stopped:
            await server.stop(grace=1)


async def test_a_health_watch_ends_when_the_drain_begins(system: System) -> None:
    server = IngressServer(ingress_settings(system.settings))
    await server.start()
    stopping: asyncio.Future[None] | None = None
    try:
        await wait_for_ingress(server.settings)
        async with grpc.aio.insecure_channel(server.settings.grpc_listen) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            first = await asyncio.wait_for(watch.read(), 30)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            started = time.monotonic()
            stopping = asyncio.ensure_future(server.stop(grace=10))
            _, code, details = await _ended(watch, 5)
            assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
            await stopping
            assert time.monotonic() - started < 5, "the Watch held the stop"
    finally:
        if stopping is None:
            await server.stop(grace=1)


async def test_the_inflight_gauge_comes_back_to_zero_after_the_writes(system: System, tenant: str) -> None:
    """The in-flight gauge is published once per event-loop iteration; the last publication must
    follow the slots' release, not stay at the last burst's count."""
    server = IngressServer(ingress_settings(system.settings))
    await server.start()
    try:
        await wait_for_ingress(server.settings)
        async with grpc.aio.insecure_channel(server.settings.grpc_listen) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            conversation_id = await start_conversation(stub, tenant)
            await asyncio.gather(
                *(stub.SendMessage(message(tenant, conversation_id, f"g{i}")) for i in range(20))
            )

            def gauge() -> float | None:
                return REGISTRY.get_sample_value("switchboard_inflight_writes")

            await eventually(
                lambda: asyncio.sleep(0, gauge()), lambda v: v == 0, within_s=10, what="the gauge at 0"
            )
            assert server.producer.inflight == 0
    finally:
        await server.stop(grace=1)
