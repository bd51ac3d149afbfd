"""The analyst endpoint streams results and stops work nobody waits for (issue 9 §3): a SELECT's
rows leave block by block with chunked transfer encoding (never the whole result in memory), an
error after the first bytes is reported as ClickHouse reports it, a client that hangs up stops
its query (the next queries are served), and a client that stalls in its request head is
dropped. Real chdb, real sockets, real clickhouse-connect.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import urllib.parse
import urllib.request
import uuid
from typing import Any

import chdb
import clickhouse_connect
import psutil
import pytest
from clickhouse_connect.driver.exceptions import StreamFailureError

from services.analytics import EndpointPolicy, QueryEndpoint
from services.analytics._endpoint import STREAMED_FORMATS
from tests.conftest import eventually
from tests.integration.test_analytics import process_chdb, process_endpoint, serve

pytestmark = pytest.mark.integration

# Slow by design: billions of hashes, no result until the end (a count).
SLOW = "SELECT count() FROM numbers(10000000000) WHERE sipHash64(number) = 0"
# Endless, for a streaming client: rows as fast as the engine makes them.
ENDLESS = "SELECT number, toString(number) FROM numbers(10000000000)"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> QueryEndpoint:
    return process_endpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def engine_conn(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A plain chdb connection to the same directory: the engine's own view, not the endpoint's."""
    conn = chdb.connect(str(process_chdb(tmp_path_factory)[0].resolve()))
    yield conn
    conn.close()


def running(conn: Any, text: str) -> int:
    """How many statements containing `text` the engine is running now."""
    marker = text.replace("'", "\\'")
    sql = f"SELECT count() FROM system.processes WHERE position(query, '{marker}') > 0 AND query NOT LIKE '%system.processes%'"
    return int(conn.query(sql, "TSV").bytes().strip())


def open_query(port: int, sql: str, fmt: str = "TSV") -> socket.socket:
    """Send a query over a raw socket and return it unread (the test decides when to hang up)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    body = sql.encode()
    sock.sendall(
        f"POST /?default_format={fmt} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test\r\n"
        f"Content-Length: {len(body)}\r\nContent-Type: text/plain\r\n\r\n".encode()
        + body
    )
    return sock


def post(port: int, sql: str, **params: str) -> tuple[int, dict[str, str], bytes]:
    url = f"http://127.0.0.1:{port}/?{urllib.parse.urlencode(params)}"
    request = urllib.request.Request(url, data=sql.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as resp:
        return resp.status, dict(resp.headers), resp.read()


@pytest.mark.parametrize("fmt", sorted(STREAMED_FORMATS))
def test_a_streamed_format_gives_the_bytes_a_buffered_query_gives(
    endpoint: QueryEndpoint, engine_conn: Any, fmt: str
) -> None:
    # Several blocks (block size 10,000), strings, arrays and nulls: each streamed format's
    # output for the whole result is the concatenation of its blocks' outputs.
    sql = (
        "SELECT number, toString(number) AS s, [number, 1] AS a, if(number % 7 = 0, NULL, number) AS n "
        "FROM numbers(45000) SETTINGS max_block_size = 10000"
    )
    status, headers, body = post(endpoint.port, sql, default_format=fmt)
    assert status == 200
    assert headers.get("Transfer-Encoding") == "chunked"
    assert body == bytes(engine_conn.query(sql, fmt).bytes())


def test_a_large_result_starts_at_once_and_is_never_held_whole(endpoint: QueryEndpoint) -> None:
    # A result no server could hold (10 billion rows, ~190 GB as TSV): the first bytes arrive at
    # once, and reading 400 MB of it grows this process (which runs the endpoint) by far less.
    process = psutil.Process(os.getpid())
    sock = open_query(endpoint.port, ENDLESS)
    reader = sock.makefile("rb")
    started = time.monotonic()
    status = reader.readline()
    assert status.startswith(b"HTTP/1.1 200"), status
    while reader.readline() not in (b"\r\n", b""):
        pass
    assert reader.read(1 << 20)
    first_mb_s = time.monotonic() - started
    rss_before = process.memory_info().rss
    received = 0
    while received < 400 << 20:
        chunk = reader.read(1 << 20)
        assert chunk
        received += len(chunk)
    growth = process.memory_info().rss - rss_before
    sock.close()
    assert first_mb_s < 15, first_mb_s
    assert growth < 150 << 20, f"the process grew by {growth >> 20} MiB while streaming 400 MiB"


def test_an_error_after_the_first_rows_is_appended_as_clickhouse_does(endpoint: QueryEndpoint) -> None:
    sql = "SELECT number, intDiv(1, number - 150000) FROM numbers(1000000) SETTINGS max_block_size = 10000"
    status, headers, body = post(endpoint.port, sql)
    assert status == 200
    tag = headers["X-ClickHouse-Exception-Tag"]
    rows, _, failure = body.partition(b"__exception__\r\n" + tag.encode() + b"\r\n")
    assert rows.startswith(b"0\t") and rows.count(b"\n") >= 10000
    assert b"Code: 153. DB::Exception: Division by zero" in failure
    assert failure.endswith(tag.encode() + b"\r\n__exception__\r\n")
    # clickhouse-connect raises where the stream broke, in every query shape it streams.
    client = clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port)
    with pytest.raises(StreamFailureError, match="Division by zero"):
        client.query_df(sql)
    with pytest.raises(StreamFailureError, match="Division by zero"):
        with client.query_rows_stream(sql) as stream:
            for _ in stream:
                pass
    assert client.query("SELECT 1").result_rows == [(1,)]


@pytest.mark.parametrize(
    ("sql", "fmt", "read_first"),
    [
        (SLOW, "TSV", False),  # no row before the end: the client hangs up while it runs
        (SLOW, "JSON", False),  # a format formatted whole (not streamed)
        (ENDLESS, "TSV", True),  # the client hangs up in the middle of the stream
        (ENDLESS, "Native", True),
    ],
)
async def test_a_client_that_hangs_up_stops_its_query(
    endpoint: QueryEndpoint, engine_conn: Any, sql: str, fmt: str, read_first: bool
) -> None:
    marked = f"{sql} /* {uuid.uuid4().hex} */"
    sock = open_query(endpoint.port, marked, fmt)
    await eventually(
        lambda: asyncio.to_thread(running, engine_conn, marked),
        lambda n: n == 1,
        within_s=30,
        what="query runs",
    )
    if read_first:
        assert len(sock.recv(65536)) > 0
    sock.close()
    stopped = time.monotonic()
    await eventually(
        lambda: asyncio.to_thread(running, engine_conn, marked),
        lambda n: n == 0,
        within_s=10,
        what="query stopped",
    )
    assert time.monotonic() - stopped < 10
    status, _, body = await asyncio.to_thread(post, endpoint.port, "SELECT 42")
    assert (status, body) == (200, b"42\n")


async def test_hung_up_queries_on_every_query_thread_leave_the_endpoint_serving(
    tmp_path_factory: pytest.TempPathFactory, engine_conn: Any
) -> None:
    # More abandoned slow queries than query threads: every thread is stopped and freed.
    small = serve(process_chdb(tmp_path_factory)[0], None, threads=2)
    marker = uuid.uuid4().hex
    sockets = [open_query(small.port, f"{SLOW} /* {marker} {i} */") for i in range(4)]
    await eventually(
        lambda: asyncio.to_thread(running, engine_conn, marker),
        lambda n: n == 2,
        within_s=30,
        what="2 queries run",
    )
    for sock in sockets:
        sock.close()
    await eventually(
        lambda: asyncio.to_thread(running, engine_conn, marker),
        lambda n: n == 0,
        within_s=15,
        what="all stopped",
    )
    started = time.monotonic()
    status, _, body = await asyncio.to_thread(post, small.port, "SELECT 7")
    assert (status, body) == (200, b"7\n")
    assert time.monotonic() - started < 10


def test_a_client_that_stalls_in_its_request_head_is_dropped(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    guarded = serve(process_chdb(tmp_path_factory)[0], EndpointPolicy(idle_timeout_s=1.0))
    for partial in (b"", b"POST /?query=SELECT%201 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Cli"):
        sock = socket.create_connection(("127.0.0.1", guarded.port), timeout=30)
        started = time.monotonic()
        sock.sendall(partial)
        assert sock.recv(100) == b""  # closed by the server, not by our 30 s timeout
        assert time.monotonic() - started < 5
        sock.close()
    # A client that keeps trickling bytes is dropped too (the bound is not reset by each byte).
    sock = socket.create_connection(("127.0.0.1", guarded.port), timeout=30)
    started = time.monotonic()
    sock.setblocking(True)
    head = b"GET /?query=SELECT%201 HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 100
    closed = False
    for byte in head:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.1)
    assert closed or sock.recv(100) == b""
    assert time.monotonic() - started < 8
    sock.close()
    # Whole requests are still answered.
    assert post(guarded.port, "SELECT 1")[2] == b"1\n"


def test_clickhouse_connect_reads_variant_dynamic_and_json_columns(endpoint: QueryEndpoint) -> None:
    # clickhouse-connect asks for client_protocol_version 54405 (BlockInfo before each block): the
    # endpoint adds it per streamed block, so the types whose layout it cannot walk still work.
    client = clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port)
    assert client.protocol_version
    rows = client.query(
        "SELECT number::Variant(UInt64, String) AS v, number::Dynamic AS d, "
        "CAST(concat('{\"a\":', toString(number), '}') AS JSON) AS j FROM numbers(3)"
    ).result_rows
    assert [(v, d, j) for v, d, j in rows] == [(n, n, {"a": n}) for n in range(3)]


def test_a_with_insert_statement_is_not_streamed(endpoint: QueryEndpoint) -> None:
    # `WITH … INSERT` starts with WITH but writes: chdb cannot stream it, so it runs whole.
    table = f"default.with_insert_{uuid.uuid4().hex[:8]}"
    client = clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port)
    client.command(f"CREATE TABLE {table} (y UInt8) ENGINE = MergeTree ORDER BY y")
    client.command(f"WITH 7 AS y INSERT INTO {table} SELECT y")
    assert client.query(f"SELECT y FROM {table}").result_rows == [(7,)]
    client.command(f"DROP TABLE {table}")
