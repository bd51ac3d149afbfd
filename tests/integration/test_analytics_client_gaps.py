"""The gaps clickhouse-connect's own integration tests found in the embedded endpoint: errors in a
streamed query, bytes that are not UTF-8 in a query, DateTime64 with a time zone into pandas,
SHOW CREATE; and what cannot work embedded, refused with ClickHouse's own errors."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from typing import Any

import clickhouse_connect
import pandas as pd
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, StreamFailureError

from services.analytics import QueryEndpoint
from tests.integration.test_analytics import process_endpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> QueryEndpoint:
    return process_endpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def client(endpoint: QueryEndpoint) -> Any:
    return clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port)


def post(endpoint: QueryEndpoint, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(endpoint.url + "/", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_bytes_that_are_not_utf8_reach_the_engine_as_sent(endpoint: QueryEndpoint, client: Any) -> None:
    assert post(endpoint, b"SELECT hex('\xff\xfe\x80'), length('\xff\xfe\x80')") == (200, b"FFFE80\t3\n")
    table = f"default.bytes_{uuid.uuid4().hex[:8]}"
    client.command(f"CREATE TABLE {table} (s String) ENGINE = MergeTree ORDER BY s")
    assert post(endpoint, f"INSERT INTO {table} VALUES ('".encode() + b"caf\xe9\x00\xff')")[0] == 200
    assert client.query(f"SELECT hex(s) FROM {table}").result_rows == [("636166E900FF",)]
    # And back out: a String column holds bytes; clickhouse-connect can read them as bytes.
    assert client.query(f"SELECT s FROM {table}", query_formats={"String": "bytes"}).result_rows == [
        (b"caf\xe9\x00\xff",)
    ]


def test_show_create(client: Any) -> None:
    table = f"default.shown_{uuid.uuid4().hex[:8]}"
    client.command(f"CREATE TABLE {table} (k UInt32, v String) ENGINE = MergeTree ORDER BY k")
    text = client.command(f"SHOW CREATE TABLE {table}")
    assert isinstance(text, str) and text.startswith(f"CREATE TABLE {table}") and "ORDER BY k" in text
    assert client.query(f"SHOW CREATE TABLE {table}").result_rows[0][0].startswith("CREATE TABLE")
    assert "CREATE VIEW switchboard.events" in client.command("SHOW CREATE TABLE switchboard.events")


def test_datetime64_with_a_time_zone_into_pandas(client: Any) -> None:
    df = client.query_df(
        "SELECT toDateTime64('2025-01-01 08:00:00.123', 3, 'Asia/Shanghai') AS shanghai, "
        "toDateTime64('2025-01-01 00:00:00.123456', 6, 'UTC') AS utc"
    )
    assert str(df["shanghai"].dtype) == "datetime64[ms, Asia/Shanghai]"
    assert df["shanghai"][0] == pd.Timestamp("2025-01-01 00:00:00.123", tz="UTC")
    # UTC columns come back naive (clickhouse-connect's default tz_mode "naive_utc", as from a server).
    assert df["utc"][0] == pd.Timestamp("2025-01-01 00:00:00.123456")
    assert client.query_df("SELECT now64(3, 'Europe/Berlin') AS t")["t"].dt.tz is not None


def test_an_error_in_a_streamed_query_is_reported_with_clickhouses_message(client: Any) -> None:
    sql = "SELECT toString(cityHash64(number)) FROM numbers(1000000) WHERE intDiv(1, number - 300000) > -100000000"
    blocks = 0
    # The first blocks arrive; the error comes where the stream broke, as from a server.
    with pytest.raises(StreamFailureError, match=r"Code: 153\..*Division by zero"):
        with client.query_row_block_stream(sql) as stream:
            for _ in stream:
                blocks += 1
    assert blocks >= 1
    # An error before the first block is an error response, raised by the call itself.
    with pytest.raises(DatabaseError, match=r"Code: 153\.") as info:
        client.query("SELECT intDiv(1, number - 0) FROM numbers(10)")
    assert not isinstance(info.value, StreamFailureError)
    # The failure leaves the client and its session usable.
    assert client.query("SELECT 1").result_rows == [(1,)]


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("CREATE ROW POLICY p ON default.t USING 1 TO ALL", "ACCESS_DENIED"),
        ("SHOW ROW POLICIES", "ACCESS_DENIED"),
        ("CREATE ROLE analyst", "ACCESS_DENIED"),
        ("SET ROLE analyst", "UNKNOWN_ROLE"),
        ("GRANT SELECT ON switchboard.* TO analyst", "UNKNOWN_ROLE"),
        ("CREATE USER someone", "ACCESS_DENIED"),
        ("SELECT * FROM system.query_log", "UNKNOWN_TABLE"),
    ],
)
def test_what_cannot_work_embedded_is_refused_with_clickhouses_error(
    client: Any, sql: str, error: str
) -> None:
    with pytest.raises(DatabaseError, match=rf"Code: \d+\. DB::Exception: .*\({error}\)"):
        client.query(sql)
