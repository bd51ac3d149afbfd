"""While the broker refuses connections, aiokafka's metadata updates wait retry_backoff_ms apart.

Seen in the ingress', assistant's and archiver's logs of a fresh-clone CI run while the broker
was down in test_durability.py::test_broker_restart_never_acks_what_kafka_did_not_persist
[sigterm]: "Unable connect to node with id 1: [Errno 111] Connection refused [40494 more like
this in the last 5s not logged]", 4,000-8,000 failed metadata updates a second per process for as
long as the broker was down, on the two cores the restarting broker needs. A broker in controlled
shutdown answers metadata requests with leader -1 for every partition for ~80 ms before it closes
its port; a client that refreshed then keeps -1 (every later update fails), and aiokafka 0.14's
fetcher (`invalid_metadata`) and producer sender (`unknown_leaders_exist`) then ask for an update,
get `_metadata_update`'s failure at once (no back-off) and ask again (related upstream:
aio-libs/aiokafka#1155).
benchmarks/kafka_outage.py reproduces that with a real broker; this test the loop itself.

Kafka away here is a port on 127.0.0.1 that refuses connections, no mock: the client knows
broker 1 at that port, as a client does once its broker has gone. The attempts are counted as
aiokafka's own log records of the refused connects.
"""

from __future__ import annotations

import ast
import asyncio
import gc
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.metadata import MetadataResponse_v0

import services.kafka_clients  # noqa: F401  (what every process of ours imports with aiokafka)
from services.settings import PROJECT_ROOT

RETRY_BACKOFF_MS = 100
WATCH_S = 1.0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def orphaned_client() -> AsyncIterator[AIOKafkaClient]:
    """A client whose only known broker (id 1) is a refused port, with its metadata task
    running: what every client of ours is once the broker is killed."""
    port = closed_port()
    client = AIOKafkaClient(bootstrap_servers=f"127.0.0.1:{port}", retry_backoff_ms=RETRY_BACKOFF_MS)
    # What `bootstrap()` leaves behind when the broker answered it (it cannot answer here).
    client.cluster.update_metadata(MetadataResponse_v0([(1, "127.0.0.1", port)], []))
    client._sync_task = asyncio.create_task(client._md_synchronizer())
    try:
        yield client
    finally:
        await client.close()


async def test_refused_metadata_updates_wait_retry_backoff_apart(
    orphaned_client: AIOKafkaClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="aiokafka")
    results = []
    deadline = time.monotonic() + WATCH_S
    # What the consumer's fetcher does while its partitions' leader is -1 (fetcher.py,
    # `invalid_metadata`): ask for an update, wait for it, ask again.
    while time.monotonic() < deadline:
        results.append(await orphaned_client.force_metadata_update())
    attempts = sum(1 for r in caplog.records if r.getMessage().startswith("Unable connect to node with id 1"))

    assert results and not any(results), results[:5]
    # One update per retry_backoff_ms, plus slack for the first (not delayed) and a slow machine.
    bound = WATCH_S / (RETRY_BACKOFF_MS / 1000) + 3
    assert attempts <= bound, f"{attempts} refused connects in {WATCH_S} s (at most {bound:.0f} expected)"
    assert len(results) <= bound, f"{len(results)} failed metadata updates in {WATCH_S} s"


# What makes an aiokafka client (each has an AIOKafkaClient inside): a module that only imports
# aiokafka for its loggers or errors runs no metadata updates.
CLIENT_CLASSES = {"AIOKafkaClient", "AIOKafkaConsumer", "AIOKafkaProducer", "AIOKafkaAdminClient"}


def _makes_clients(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "aiokafka":
            if any(a.name in CLIENT_CLASSES for a in node.names):
                return True
        if isinstance(node, ast.Attribute) and node.attr in CLIENT_CLASSES:
            return True
    return False


def _imports_kafka_clients(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "services.kafka_clients" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (
            node.module == "services.kafka_clients"
            or (node.module == "services" and any(a.name == "kafka_clients" for a in node.names))
        ):
            return True
    return False


def _parsed(path: Path) -> ast.Module:
    """ast.parse with the garbage collector held off: in a worker that ran integration tests, a
    collection during the parse ran finalizers (an asyncio task's "exception was never retrieved"
    log) inside CPython 3.11.7's AST constructor, which then raised "SystemError: AST constructor
    recursion depth mismatch" (seen once in CI; a CPython bug, not this code's)."""
    source = path.read_text()
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source, filename=str(path))
    finally:
        if enabled:
            gc.enable()


def test_every_module_that_makes_aiokafka_clients_imports_the_back_off() -> None:
    """The back-off is applied when services.kafka_clients is imported; a module of ours that
    makes aiokafka clients without importing it may run them unthrottled in some process (a
    command, the replay) that imports nothing else of ours that does."""
    missing = []
    for root in ("services", "streams"):
        for path in sorted((PROJECT_ROOT / root).rglob("*.py")):
            tree = _parsed(path)
            if _makes_clients(tree) and path != PROJECT_ROOT / "services" / "kafka_clients.py":
                if not _imports_kafka_clients(tree):
                    missing.append(str(Path(path).relative_to(PROJECT_ROOT)))
    assert not missing, f"import services.kafka_clients in: {missing}"
