"""An ingress says SERVING only once it has read the erasure registry.

Found by review: health followed the hot view alone, so a process whose read of the privacy topic
had not finished (Kafka slow, or stopped) said SERVING; a load balancer then sent it writes that
each waited for the registry up to produce_timeout_s and were refused UNAVAILABLE
(services/ingress/_writes.py `_erased`). Kafka not answering is a broker stopped with SIGSTOP
(connections still accepted, nothing answered), as in test_erasure_follower_bound.
"""

from __future__ import annotations

import signal

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services import stack
from services.ingress import IngressServer
from services.processes import wait_for_ingress
from services.settings import Settings
from tests.integration.conftest import System, eventually

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def beside(base: Settings) -> Settings:
    host, port = base.grpc_listen.rsplit(":", 1)
    return base.model_copy(update={"grpc_listen": f"{host}:{int(port) + 31}"})


@pytest.mark.timeout(180)
async def test_a_new_ingress_is_not_serving_until_it_read_the_erasure_registry(system: System) -> None:
    await wait_for_ingress(system.settings)  # the hot view is complete: only the registry is missing
    broker = psutil.Process((await stack.status(system.settings))["kafka"]["pid"])
    server = IngressServer(beside(system.settings))
    follow = server.service.writes.follow_erasures

    def follow_with_kafka_stopped() -> None:
        # Kafka answered the producer's start and the API keys' read, and stops answering just as
        # the ingress begins reading the erasure registry: deterministic, and what a Kafka that
        # slows down or goes away during a start looks like.
        broker.send_signal(signal.SIGSTOP)
        follow()

    server.service.writes.follow_erasures = follow_with_kafka_stopped  # type: ignore[method-assign]
    channel = grpc.aio.insecure_channel(server.settings.grpc_listen)
    health = health_pb2_grpc.HealthStub(channel)

    async def status() -> int:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return int(reply.status)

    try:
        try:
            await server.start()
            assert not server.service.writes.erasures_ready
            assert await status() == NOT_SERVING, "SERVING before the erasure registry was read"
            for name in ("switchboard.v1.ChatService", "switchboard.v1.AgentService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert reply.status == NOT_SERVING, name
        finally:
            broker.send_signal(signal.SIGCONT)
        # Kafka answers again: the read goes on and the process says SERVING.
        await eventually(
            status, lambda s: s == SERVING, within_s=90, what="SERVING once the registry is read"
        )
        assert server.service.writes.erasures_ready
    finally:
        await channel.close()
        await server.stop(grace=1)


async def test_a_new_ingress_listens_only_once_it_read_the_erasure_registry(system: System) -> None:
    # Seen in a CI run: an ingress process started again beside its sibling (SO_REUSEPORT) got new
    # connections at once and said NOT_SERVING on them while the sibling said SERVING; writes on
    # them waited for this read. Now the process listens once the read is done (bounded).
    await wait_for_ingress(system.settings)
    server = IngressServer(beside(system.settings))
    try:
        await server.start()
        assert server.service.writes.erasures_ready, "listening before the erasure registry was read"
        async with grpc.aio.insecure_channel(server.settings.grpc_listen) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
        assert reply.status == SERVING
    finally:
        await server.stop(grace=1)
