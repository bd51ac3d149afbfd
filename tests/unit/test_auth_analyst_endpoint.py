"""The analyst endpoint's guard: pure decisions over headers, credentials and SQL; bounded bodies."""

from __future__ import annotations

import base64
import gzip

import pytest
import zstandard

from services.analytics._endpoint import QueryError, _decompress
from services.analytics._guard import (
    EndpointPolicy,
    Refusal,
    authenticate,
    browser_refusal,
    credentials,
    reader_refusal,
    reader_settings,
)

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"
POLICY = EndpointPolicy(
    admin_password="s3cret",
    allowed_hosts=frozenset({"localhost", "127.0.0.1", "[::1]"}),
    allowed_origins=frozenset({"http://grafana.local:3000"}),
)


@pytest.mark.parametrize(
    ("method", "headers", "refused"),
    [
        ("GET", {"Host": "127.0.0.1:8123"}, False),
        ("GET", {"Host": "localhost"}, False),
        ("GET", {"Host": "[::1]:8123"}, False),
        ("GET", {"Host": "rebind.evil.example:8123"}, True),
        ("GET", {"Host": "127.0.0.1:8123", "Origin": "http://evil.example"}, True),
        ("GET", {"Host": "127.0.0.1:8123", "Origin": "http://grafana.local:3000"}, False),
        ("GET", {"Host": "127.0.0.1:8123", "Sec-Fetch-Site": "cross-site"}, True),
        ("POST", {"Host": "127.0.0.1", "Content-Type": "text/plain", "User-Agent": FIREFOX}, True),
        (
            "POST",
            {"Host": "127.0.0.1", "Content-Type": "application/x-www-form-urlencoded", "User-Agent": FIREFOX},
            True,
        ),
        (
            "POST",
            {"Host": "127.0.0.1", "Content-Type": "multipart/form-data; boundary=x", "User-Agent": FIREFOX},
            True,
        ),
        ("POST", {"Host": "127.0.0.1", "User-Agent": "curl/8.5", "Sec-Fetch-Mode": "no-cors"}, True),
        ("POST", {"Host": "127.0.0.1"}, True),
        ("POST", {"Host": "127.0.0.1", "User-Agent": "clickhouse-connect/0.8 (lv:py/3.11)"}, False),
        ("POST", {"Host": "127.0.0.1", "Content-Type": "text/plain", "User-Agent": "curl/8.5"}, False),
        ("POST", {"Host": "127.0.0.1", "Content-Type": "text/plain", "Authorization": "Basic eDp5"}, False),
        ("POST", {"Host": "127.0.0.1", "Content-Type": "text/plain", "X-ClickHouse-User": "default"}, False),
        ("POST", {"Host": "127.0.0.1", "Content-Type": "application/octet-stream"}, False),
    ],
)
def test_browser_rules(method: str, headers: dict[str, str], refused: bool) -> None:
    refusal = browser_refusal(POLICY, method, headers)
    assert (refusal is not None) is refused
    if refusal is not None:
        assert refusal.code == 497 and refusal.status == 403


def test_credentials_as_clickhouse_reads_them() -> None:
    basic = "Basic " + base64.b64encode(b"admin:s3cret").decode()
    assert credentials({"Authorization": basic}, {}) == ("admin", "s3cret")
    assert credentials({"X-ClickHouse-User": "admin", "X-ClickHouse-Key": "k"}, {}) == ("admin", "k")
    assert credentials({}, {"user": "admin", "password": "p"}) == ("admin", "p")
    assert credentials({}, {}) == ("default", "")
    assert authenticate(POLICY, "admin", "s3cret") is True
    assert authenticate(POLICY, "default", "") is False
    # `default` has no password, as on a ClickHouse server: one sent is wrong (a new user's
    # walkthrough: `-u default:wrong` was let in, so a mistyped admin user name read silently).
    refused = authenticate(POLICY, "default", "wrong")
    assert isinstance(refused, Refusal) and refused.code == 516
    wrong = authenticate(POLICY, "admin", "nope")
    assert isinstance(wrong, Refusal) and wrong.code == 516
    unknown = authenticate(POLICY, "mallory", "")
    assert isinstance(unknown, Refusal) and unknown.code == 192
    # No admin password: nobody writes, "admin" is just unknown.
    assert isinstance(authenticate(EndpointPolicy(), "admin", ""), Refusal)


@pytest.mark.parametrize(
    ("sql", "code"),
    [
        ("SELECT 1", None),
        ("SELECT 'file(x)' AS s", 497),  # conservative: the words are refused even in a string
        ("SELECT * FROM file('/etc/passwd', 'LineAsString')", 497),
        ("select * from URL('http://x', 'CSV', 'a String')", 497),
        ("SELECT * FROM remote('h', system.one)", 497),
        ("SELECT * FROM executable('ls', 'TSV', 'x String')", 497),
        ("SELECT 1 INTO OUTFILE '/tmp/x'", 164),
        ("SELECT profile FROM events", None),
    ],
)
def test_what_readers_may_not_borrow(sql: str, code: int | None) -> None:
    refusal = reader_refusal(sql)
    assert (refusal.code if refusal else None) == code


def test_reader_time_limit() -> None:
    assert reader_settings(POLICY, {})["max_execution_time"] == "60"
    assert reader_settings(POLICY, {"max_execution_time": "0"})["max_execution_time"] == "60"
    assert reader_settings(POLICY, {"max_execution_time": "9999"})["max_execution_time"] == "60"
    assert reader_settings(POLICY, {"max_execution_time": "5"})["max_execution_time"] == "5"
    assert "max_result_bytes" in reader_settings(POLICY, {})


def test_bodies_are_bounded_compressed_or_not() -> None:
    bomb = gzip.compress(b"\0" * (4 << 20), compresslevel=1)
    assert len(bomb) < 64 << 10
    with pytest.raises(QueryError) as too_big:
        _decompress(bomb, "gzip", limit=1 << 20)
    assert too_big.value.code == 307 and too_big.value.http_status == 413
    assert _decompress(bomb, "gzip", limit=4 << 20) == b"\0" * (4 << 20)
    packed = zstandard.ZstdCompressor().compress(b"x" * (2 << 20))
    with pytest.raises(QueryError):
        _decompress(packed, "zstd", limit=1 << 20)
    assert _decompress(packed, "zstd", limit=2 << 20) == b"x" * (2 << 20)
    import lz4.frame

    framed = lz4.frame.compress(b"y" * (2 << 20))
    with pytest.raises(QueryError):
        _decompress(framed, "lz4", limit=1 << 20)
    assert _decompress(framed, "lz4") == b"y" * (2 << 20)
