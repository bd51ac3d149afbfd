"""A request written to a Kafka connection the broker has just reset fails as a connection error,
and the client's metadata task lives on.

Seen (benchmarks/commit_wedge.py, and a soak's sessions fold standing 34 s): under uvloop, a write
on a transport whose peer reset it raises RuntimeError ("... the handler is closed") once uvloop
has handled the reset, and aiokafka 0.14's `AIOKafkaConnection.send` turns only OSError into a
connection error; aiokafka's own reader closes the connection a step later. A broker's kill -9
opens that window: a metadata request written into it ended the client's metadata task with the
RuntimeError, for good; from then on `force_metadata_update()` never completed, and the group
coordination waited on it holding the coordinator lookup lock, so every commit waited until the
consumer was started again. services/kafka_clients.py patches `send` (and makes a failed metadata
update of any kind an answer, not the task's end).

The peer here is a TCP server on 127.0.0.1 that resets the connection as a killed process's kernel
does (SO_LINGER 0, then close), no Kafka needed for a write to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from aiokafka.client import AIOKafkaClient
from aiokafka.conn import AIOKafkaConnection
from aiokafka.errors import KafkaConnectionError
from aiokafka.protocol.metadata import MetadataRequest, MetadataResponse_v0

import services.kafka_clients as kafka_clients


def on_uvloop(test: Callable[[], Awaitable[None]]) -> None:
    """Run `test` on uvloop, as every process of ours does (plain asyncio only logs such a write)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(test(), 30))


class Peer:
    """A TCP peer on 127.0.0.1 that accepts, answers nothing, and can reset its connections."""

    def __init__(self) -> None:
        self.accepted: list[asyncio.StreamWriter] = []
        self.connected = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted.append(writer)
            self.connected.set()
            try:
                await reader.read()
            finally:
                writer.close()

        self.server = await asyncio.start_server(hold, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def reset(self, conn: AIOKafkaConnection) -> None:
        """Reset the connection (the broker's kill -9), then run the loop until uvloop has handled
        the reset (its transport is closed), not until aiokafka's reader has."""
        await self.connected.wait()
        writer = self.accepted.pop()
        self.connected.clear()
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()
        for _ in range(1000):
            if conn._closed_fut.done():
                break
            await asyncio.sleep(0)
        assert conn._closed_fut.done(), "the reset never reached the client"
        assert conn._writer is not None, "aiokafka closed the connection before the window"

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def connected(port: int, monkeypatch: pytest.MonkeyPatch) -> AIOKafkaConnection:
    """A connection to the peer as aiokafka makes it, its version lookup skipped (the peer is not
    Kafka) and its result put in place."""

    async def no_lookup(self: AIOKafkaConnection) -> None:
        self._versions = {MetadataRequest.API_KEY: (0, 12)}

    monkeypatch.setattr(AIOKafkaConnection, "_do_version_lookup", no_lookup)
    conn = AIOKafkaConnection("127.0.0.1", port, request_timeout_ms=2_000)
    await conn.connect()
    return conn


@contextlib.asynccontextmanager
async def client_of_a_peer() -> AsyncIterator[tuple[Peer, int, AIOKafkaClient]]:
    """A peer, its port, and a client as `bootstrap()` leaves it: broker 1 (the peer) known, its
    metadata task running; both closed afterwards."""
    peer = Peer()
    port = await peer.start()
    client = AIOKafkaClient(
        bootstrap_servers=f"127.0.0.1:{port}", retry_backoff_ms=100, request_timeout_ms=1_000
    )
    client.cluster.update_metadata(MetadataResponse_v0([(1, "127.0.0.1", port)], []))
    client._sync_task = asyncio.create_task(client._md_synchronizer())
    try:
        yield peer, port, client
    finally:
        await client.close()
        await peer.close()


def test_the_patch_is_in_place() -> None:
    assert kafka_clients.CLOSED_WRITE_PATCHED


def test_a_request_written_to_a_reset_connection_is_a_connection_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def test() -> None:
        peer = Peer()
        conn = await connected(await peer.start(), monkeypatch)
        try:
            await peer.reset(conn)
            assert conn.connected()  # what aiokafka's _get_conn asks before handing it out
            with pytest.raises(KafkaConnectionError):
                conn.send(MetadataRequest([]))
            assert not conn.connected()
        finally:
            conn.close()
            await peer.close()

    on_uvloop(test)


def test_another_runtime_error_is_not_taken_for_a_closed_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    async def test() -> None:
        peer = Peer()
        conn = await connected(await peer.start(), monkeypatch)

        class Broken:
            def prepare(self, versions: Any) -> Any:
                raise RuntimeError("a bug of ours")

        try:
            with pytest.raises(RuntimeError, match="a bug of ours"):
                conn.send(Broken())
            assert conn.connected()
            await peer.reset(conn)  # also while the transport is closed: still the bug's error
            with pytest.raises(RuntimeError, match="a bug of ours"):
                conn.send(Broken())
        finally:
            conn.close()
            await peer.close()

    on_uvloop(test)


def test_the_metadata_task_lives_on_after_a_write_into_a_reset_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def test() -> None:
        async with client_of_a_peer() as (peer, port, client):
            conn = await connected(port, monkeypatch)
            client._conns[(1, 0)] = conn  # its connection open, as `bootstrap()` leaves it
            real_get_conn = AIOKafkaClient._get_conn
            resets: list[AIOKafkaConnection] = []

            async def reset_after_lookup(self: AIOKafkaClient, node_id: Any, **kwargs: Any) -> Any:
                # The broker's kill -9 lands between the metadata task's lookup of its connection
                # and its write: uvloop has handled the reset, aiokafka's reader has not closed it.
                found = await real_get_conn(self, node_id, **kwargs)
                if found is conn and not resets:
                    resets.append(conn)
                    await peer.reset(conn)
                return found

            monkeypatch.setattr(AIOKafkaClient, "_get_conn", reset_after_lookup)
            updated = await asyncio.wait_for(client.force_metadata_update(), 5)
            assert resets == [conn], "the write into the reset connection did not happen"
            assert updated is False  # the write failed: no update, but an answer
            assert not client._sync_task.done(), client._sync_task
            # The next one goes to a new connection, which the peer never answers: the request
            # times out (1 s), and the task answers again.
            assert await asyncio.wait_for(client.force_metadata_update(), 5) is False
            assert not client._sync_task.done(), client._sync_task

    on_uvloop(test)


def test_a_metadata_update_failing_on_anything_else_is_answered_and_the_task_lives_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def test() -> None:
        async with client_of_a_peer() as (_, _, client):

            async def broken(self: AIOKafkaClient, node_id: Any, **kwargs: Any) -> Any:
                raise RuntimeError("not a KafkaError")

            monkeypatch.setattr(AIOKafkaClient, "_get_conn", broken)
            for _ in range(2):
                assert await asyncio.wait_for(client.force_metadata_update(), 5) is False
                assert not client._sync_task.done(), client._sync_task

    on_uvloop(test)
