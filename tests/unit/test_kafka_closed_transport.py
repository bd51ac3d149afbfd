"""A request written to a Kafka connection whose transport was just reset fails as a connection
error, and the client's metadata task lives on.

Seen (benchmarks/commit_wedge.py, and a soak's sessions fold standing 34 s): under uvloop, a write
on a transport the peer has just reset raises RuntimeError ("... the handler is closed"), and
aiokafka 0.14's `AIOKafkaConnection.send` turns only OSError into a connection error. A broker's
kill -9 opens that window: a metadata request written into it ended the client's metadata task
with that RuntimeError, for good; from then on `force_metadata_update()` never completed, and
the group coordination waited on it holding the coordinator lookup lock, so every commit waited
until the consumer was started again. services/kafka_clients.py patches `send`.

The peer here is a TCP server on 127.0.0.1 (no Kafka needed for a write to fail); the window is
opened the way the kernel's reset does it: the transport is closed before aiokafka's reader has
seen it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
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


async def silent_peer() -> tuple[asyncio.Server, int]:
    """A TCP peer on 127.0.0.1 that accepts and never answers."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def connected(port: int, monkeypatch: pytest.MonkeyPatch) -> AIOKafkaConnection:
    """A connection to the peer as aiokafka makes it (its version lookup skipped: the peer is not
    Kafka)."""

    async def no_lookup(self: AIOKafkaConnection) -> None:
        return None

    monkeypatch.setattr(AIOKafkaConnection, "_do_version_lookup", no_lookup)
    conn = AIOKafkaConnection("127.0.0.1", port, request_timeout_ms=5_000)
    await conn.connect()
    conn._versions = {MetadataRequest.API_KEY: (0, 12)}  # what the lookup would have found
    return conn


class ResetTransport:
    """The transport in the window a kill -9 opens: uvloop has closed its handle on the reset and
    refuses writes with its RuntimeError, and the protocol (aiokafka's reader) has not been told
    yet. uvloop only gets there on a peer's reset between loop iterations, so it is put in place
    here; the message is uvloop's, as logged in benchmarks/commit_wedge.py."""

    def __init__(self, real: asyncio.Transport) -> None:
        self.real = real
        real.abort()

    def write(self, data: bytes) -> None:
        raise RuntimeError(
            "unable to perform operation on <TCPTransport closed=True reading=False 0x55>; the handler is closed"
        )

    def is_closing(self) -> bool:
        return True

    def close(self) -> None:
        self.real.close()


def reset(conn: AIOKafkaConnection) -> None:
    assert conn._writer is not None
    conn._writer._transport = ResetTransport(conn._writer.transport)


def test_the_patch_is_in_place() -> None:
    assert kafka_clients.CLOSED_WRITE_PATCHED


def test_a_request_written_to_a_reset_transport_is_a_connection_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def test() -> None:
        server, port = await silent_peer()
        conn = await connected(port, monkeypatch)
        try:
            reset(conn)  # the reset is in; aiokafka's reader has not run yet
            with pytest.raises(KafkaConnectionError):
                conn.send(MetadataRequest([]))
            assert not conn.connected()
        finally:
            conn.close()
            server.close()

    on_uvloop(test)


def test_another_runtime_error_is_not_taken_for_a_closed_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    async def test() -> None:
        server, port = await silent_peer()
        conn = await connected(port, monkeypatch)

        class Broken:
            def prepare(self, versions: Any) -> Any:
                raise RuntimeError("a bug of ours")

        try:
            with pytest.raises(RuntimeError, match="a bug of ours"):
                conn.send(Broken())
            assert conn.connected()
        finally:
            conn.close()
            server.close()

    on_uvloop(test)


def test_the_metadata_task_lives_on_after_a_write_into_a_reset_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def test() -> None:
        server, port = await silent_peer()
        client = AIOKafkaClient(
            bootstrap_servers=f"127.0.0.1:{port}", retry_backoff_ms=100, request_timeout_ms=2_000
        )
        # What `bootstrap()` leaves behind: broker 1 known, its connection open, the metadata task.
        client.cluster.update_metadata(MetadataResponse_v0([(1, "127.0.0.1", port)], []))
        client._conns[(1, 0)] = await connected(port, monkeypatch)
        client._sync_task = asyncio.create_task(client._md_synchronizer())
        real_get_conn = AIOKafkaClient._get_conn
        resets: list[AIOKafkaConnection] = []

        async def reset_after_lookup(self: AIOKafkaClient, node_id: Any, **kwargs: Any) -> Any:
            # The broker's kill -9 lands between the metadata task's lookup of its connection and
            # its write (the reset is in, the reader has not run).
            conn = await real_get_conn(self, node_id, **kwargs)
            if conn is not None and not resets:
                resets.append(conn)
                reset(conn)
            return conn

        monkeypatch.setattr(AIOKafkaClient, "_get_conn", reset_after_lookup)
        try:
            updated = await asyncio.wait_for(client.force_metadata_update(), 5)
            assert resets, "the write into the reset connection did not happen"
            assert updated is False  # the broker is gone: no update, but an answer
            assert not client._sync_task.done(), client._sync_task
            # And the next one is answered too (the task did not end on the first).
            assert await asyncio.wait_for(client.force_metadata_update(), 5) is False
        finally:
            await client.close()
            server.close()

    on_uvloop(test)
