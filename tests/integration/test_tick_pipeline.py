"""The ingress's tick pipeline (claims and settlements) on its own Redis connections.

TickPipeline writes and reads its round trips on redis-py connections it keeps, not through
redis-py's Pipeline (about half the client CPU per round trip). What redis-py's pool and Pipeline
did for it must still hold, against a real Redis of the test's own (it is restarted and stopped):
replies in order with error replies as objects, a Redis restart costing no caller an error, a
Redis that does not answer refused within the socket timeout, and a round trip cut short (a
timeout, a cancellation) never leaving its late replies to be read as the next one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.ingress._hotview import TickPipeline

pytestmark = pytest.mark.integration

SOCKET_TIMEOUT_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Redis:
    """A redis-server of this test's own on 127.0.0.1, to restart and to stop."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (make test installs it)"
        self.binary = binary
        self.directory = directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[_Redis]:
    server = _Redis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                server.signal(signal.SIGCONT)
            server.kill()


@pytest.fixture
async def client(redis_server: _Redis) -> AsyncIterator[aioredis.Redis]:
    # As the ingress makes its client (IngressServer), with this test's short timeout.
    redis = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{redis_server.port}/0",
        max_connections=512,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    try:
        yield redis
    finally:
        await redis.aclose()


def _commands(*commands: tuple[Any, ...]) -> Any:
    def queue(pipe: Any) -> None:
        for command in commands:
            pipe.execute_command(*command)

    return queue


async def test_replies_come_back_in_order_to_each_caller_with_error_replies_as_objects(
    client: aioredis.Redis,
) -> None:
    tick = TickPipeline(client)
    try:
        # Queued in one tick: one round trip, each caller its own slice of the replies.
        first = tick.run(_commands(("SET", "a", "1"), ("GET", "a")), 2)
        second = tick.run(_commands(("EVALSHA", "0" * 40, 0), ("INCR", "a"), ("HGET", "a", "f")), 3)
        third = tick.run(_commands(("GET", "missing")), 1)
        assert await first == [b"OK", b"1"]
        noscript, incremented, wrong_type = await second
        assert isinstance(noscript, NoScriptError)
        assert incremented == 2
        assert isinstance(wrong_type, ResponseError) and "WRONGTYPE" in str(wrong_type)
        assert await third == [None]
        # Later ticks reuse the kept connection: no new one per round trip.
        for n in range(20):
            assert await tick.run(_commands(("INCR", "n")), 1) == [n + 1]
        assert tick._open == 1
    finally:
        await tick.close()
    assert tick._open == 0 and not tick._idle


async def test_a_redis_restart_costs_the_next_round_trip_no_error(
    client: aioredis.Redis, redis_server: _Redis
) -> None:
    tick = TickPipeline(client)
    try:
        # Two connections kept (two round trips at once), both dead after the restart.
        a = tick.run(_commands(("SET", "k", "before")), 1)
        await asyncio.sleep(0)  # the next run is a tick of its own
        b = tick.run(_commands(("GET", "k")), 1)
        assert await a == [b"OK"] and await b in ([b"before"], [None])
        assert tick._open == 2
        redis_server.kill()
        redis_server.start()
        # Both kept connections are used at once: each fails once, on its first use, and its
        # round trip is sent again on a new socket.
        a = tick.run(_commands(("SET", "k", "after")), 1)
        await asyncio.sleep(0)
        b = tick.run(_commands(("INCR", "n")), 1)
        assert await a == [b"OK"]
        assert await b == [1]
        assert await tick.run(_commands(("GET", "k")), 1) == [b"after"]
        assert tick._open == 2  # the two were opened again, none more
    finally:
        await tick.close()
    assert tick._open == 0


async def _overlapping(tick: TickPipeline, redis_server: _Redis, n: int) -> list[Any]:
    """n round trips under way at once (Redis held meanwhile, each queued in a tick of its own)."""
    redis_server.signal(signal.SIGSTOP)
    try:
        futures = []
        for i in range(n):
            futures.append(tick.run(_commands(("INCR", f"overlap{i}")), 1))
            await asyncio.sleep(0)  # the next run() is a round trip of its own
    finally:
        redis_server.signal(signal.SIGCONT)
    return list(await asyncio.gather(*futures, return_exceptions=True))


async def test_a_redis_that_does_not_answer_is_refused_within_the_timeout_and_nothing_is_read_late(
    client: aioredis.Redis, redis_server: _Redis
) -> None:
    tick = TickPipeline(client)
    try:
        assert await tick.run(_commands(("SET", "k", "v")), 1) == [b"OK"]
        # Two connections kept and connected: each round trip below is held in its read.
        assert await _overlapping(tick, redis_server, 2) == [[1], [1]]
        assert tick._open == 2 and len(tick._idle) == 2
        redis_server.signal(signal.SIGSTOP)
        try:
            # A round trip cancelled in its read (its caller's deadline, a stop): the command
            # was written to Redis, which holds it.
            cancelled = tick.run(_commands(("INCR", "counter")), 1)
            await asyncio.sleep(0.2)
            assert len(tick._running) == 1 and len(tick._idle) == 1
            for task in list(tick._running):
                task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await tick.run(_commands(("SET", "late", "1"), ("GET", "k")), 2)
            # Not retried: one socket timeout, not two (see IngressServer's Retry).
            assert time.monotonic() - started < 2 * SOCKET_TIMEOUT_S
        finally:
            redis_server.signal(signal.SIGCONT)
        assert tick._open == 0 and not tick._idle  # both held connections were closed
        # Redis now runs what it held (SET late, GET k, INCR counter) and answers on sockets
        # that were closed: none of those replies may be read as this round trip's.
        assert await tick.run(_commands(("GET", "k"), ("GET", "nothing")), 2) == [b"v", None]
        assert await tick.run(_commands(("PING",)), 1) == [b"PONG"]
        deadline = time.monotonic() + 10
        while await client.get("counter") != b"1":  # the cancelled INCR did reach Redis
            assert time.monotonic() < deadline, "the cancelled round trip's INCR never ran"
            await asyncio.sleep(0.01)
        assert await client.get("late") == b"1"
        assert tick._open == 1
    finally:
        await tick.close()
    assert tick._open == 0


async def test_overlapping_round_trips_reuse_their_connections_and_are_bounded(
    client: aioredis.Redis, redis_server: _Redis
) -> None:
    tick = TickPipeline(client)
    try:
        assert await _overlapping(tick, redis_server, 20) == [[1]] * 20
        assert tick._open == 20
        received = (await client.info("stats"))["total_connections_received"]
        # The same again: every round trip finds a kept connection, none is opened.
        assert await _overlapping(tick, redis_server, 20) == [[2]] * 20
        assert (await client.info("stats"))["total_connections_received"] == received
        assert tick._open == 20
        # Past MAX_OPEN a round trip is refused at once, as a pool past max_connections.
        tick.MAX_OPEN = 21
        outcomes = await _overlapping(tick, redis_server, 22)
        refused = [o for o in outcomes if isinstance(o, RedisConnectionError)]
        assert len(refused) == 1 and "Too many connections" in str(refused[0])
        assert [o for o in outcomes if not isinstance(o, Exception)] == [[3]] * 20 + [[1]]
        # Connections unused for IDLE_CLOSE_S are closed (the least recently used first).
        tick.IDLE_CLOSE_S = 0.05
        await asyncio.sleep(0.1)
        assert await tick.run(_commands(("PING",)), 1) == [b"PONG"]
        assert tick._open == 1
        received = (await client.info("stats"))["total_connections_received"]
        assert await tick.run(_commands(("PING",)), 1) == [b"PONG"]  # on the one kept
        assert (await client.info("stats"))["total_connections_received"] == received
        # Closed while a round trip is under way: it ends, and its connection is not kept.
        redis_server.signal(signal.SIGSTOP)
        try:
            under_way = tick.run(_commands(("PING",)), 1)
            await asyncio.sleep(0.1)  # written, and waiting for its reply
            assert len(tick._running) == 1
            await tick.close()
            assert tick._open == 1
        finally:
            redis_server.signal(signal.SIGCONT)
        assert await under_way == [b"PONG"]
        assert tick._open == 0 and not tick._idle
    finally:
        await tick.close()


async def test_a_redis_that_is_gone_fails_every_caller_of_the_round_trip(
    client: aioredis.Redis, redis_server: _Redis
) -> None:
    tick = TickPipeline(client)
    try:
        assert await tick.run(_commands(("PING",)), 1) == [b"PONG"]
        redis_server.kill()
        first = tick.run(_commands(("SET", "a", "1")), 1)
        second = tick.run(_commands(("GET", "a")), 1)
        for future in (first, second):
            with pytest.raises(RedisConnectionError):
                await future
        assert tick._open == 0  # the failed connection is not kept
        redis_server.start()
        assert await tick.run(_commands(("PING",)), 1) == [b"PONG"]
    finally:
        await tick.close()


async def test_commands_that_may_wait_leave_with_the_next_round_trip_or_by_themselves_in_time(
    client: aioredis.Redis,
) -> None:
    tick = TickPipeline(client)
    try:
        # Within an hour: nothing but another round trip (or close) can send it.
        waiting = tick.run(_commands(("SET", "w", "1")), 1, within_s=3600)
        for _ in range(10):
            await asyncio.sleep(0)
        assert not waiting.done() and await client.get("w") is None
        # The next round trip takes it along; each caller gets its own replies.
        assert await tick.run(_commands(("GET", "w")), 1) == [b"1"]
        assert await asyncio.wait_for(waiting, 5) == [b"OK"]
        assert tick._waiting_timer is None and not tick._waiting
        # With no other round trip, it leaves by itself once its time is up.
        alone = tick.run(_commands(("INCR", "w")), 1, within_s=0.01)
        assert await asyncio.wait_for(alone, 5) == [2]
        # Several waiting share the first one's timer and its round trip.
        many = [tick.run(_commands(("INCR", "w")), 1, within_s=0.01) for _ in range(3)]
        assert sorted(r[0] for r in await asyncio.wait_for(asyncio.gather(*many), 5)) == [3, 4, 5]
        assert tick._open == 1
        # Closing sends what still waits, at once.
        last = tick.run(_commands(("INCR", "w")), 1, within_s=3600)
        await tick.close()
        assert await asyncio.wait_for(last, 5) == [6]
        # After close nothing waits: sent in its own tick.
        assert await asyncio.wait_for(tick.run(_commands(("INCR", "w")), 1, within_s=3600), 5) == [7]
    finally:
        await tick.close()
