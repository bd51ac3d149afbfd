"""Stopping an ingress while its idle sweeper is at work returns promptly (real Redis and Kafka).

Found by CI: a test fixture's `IngressServer.stop()` hung past its 2-minute timeout, the port stayed
bound, and every later test needing it failed to bind. The sweeper's first sweep (a backfill over
every tenant's open set, then Kafka's end offsets) was cancelled mid-request; the client library
turned the cancellation into an error of its own, the sweeper logged it as a failed sweep and slept
its interval (30 s), and `stop()` awaited it without a bound. Reproduced here in 4 of 6 rounds.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from schemas import hotview as hv
from services.ingress import IngressServer
from services.ingress._idle import BACKFILLED_KEY
from services.processes import wait_for_ingress
from services.stack._components import port_open
from tests.conftest import System
from tests.integration.test_ingress_guarantees import ingress_settings

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
async def test_an_ingress_stopped_while_its_idle_sweeper_works_stops_at_once(system: System) -> None:
    redis = aioredis.Redis.from_url(system.settings.redis_url)
    long_ago_ms = int(time.time() * 1000) - 10**9
    try:
        # Work for the first sweep: tenants with open conversations for the backfill to index.
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(300):
                tenant = f"stop-sweep-{i}"
                pipe.sadd(hv.ACTIVE_TENANTS_KEY, tenant)
                pipe.zadd(hv.open_conversations_key(tenant), {f"c{j}": 0 for j in range(20)})
                pipe.zadd(hv.activity_key(tenant), {f"c{j}": long_ago_ms for j in range(20)})
            await pipe.execute()
        for round_ in range(6):
            await redis.delete(BACKFILLED_KEY)  # so the new server backfills first
            server = IngressServer(ingress_settings(system.settings))
            await server.start()
            await wait_for_ingress(server.settings)
            await asyncio.sleep(round_ * 0.05)  # stop at different points of the sweep
            began = time.monotonic()
            stopping = asyncio.ensure_future(server.stop(grace=1))
            done, _ = await asyncio.wait([stopping], timeout=15)
            assert done, f"round {round_}: stop() still running after 15 s"
            stopping.result()
            assert time.monotonic() - began < 15
    finally:
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(300):
                tenant = f"stop-sweep-{i}"
                pipe.srem(hv.ACTIVE_TENANTS_KEY, tenant)
                pipe.delete(hv.open_conversations_key(tenant), hv.activity_key(tenant))
            await pipe.execute()
        await redis.aclose()


@pytest.mark.timeout(120)
async def test_the_listener_closes_at_once_while_a_background_task_is_slow_to_end(system: System) -> None:
    # Found by CI (test_sigterm_drains_in_flight_calls_and_new_calls_go_to_the_others): with Kafka
    # stopped, the stopping process's sweeper took seconds to end its cancel (its Kafka client's
    # stop), and stop() waited for it before closing the listener, so new connections kept
    # reaching a draining process and its in-flight call ran past the produce timeout.
    server = IngressServer(ingress_settings(system.settings))
    await server.start()
    await wait_for_ingress(server.settings)
    assert server._sweeping is not None
    server._sweeping.cancel()
    ending = asyncio.Event()

    async def slow_to_end() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await ending.wait()  # what a Kafka client's stop against a stalled broker does
            raise

    server._sweeping = asyncio.ensure_future(slow_to_end())
    await asyncio.sleep(0)
    stopping = asyncio.ensure_future(server.stop(grace=1))
    try:
        began = time.monotonic()
        while await port_open(int(server.settings.grpc_listen.rsplit(":", 1)[1])):
            assert time.monotonic() - began < 2, "the listener stayed open while a task was ending"
            await asyncio.sleep(0.05)
        assert not stopping.done()
    finally:
        ending.set()
        await stopping
