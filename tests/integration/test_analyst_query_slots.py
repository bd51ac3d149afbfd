"""One analytics reader cannot take every query thread of the embedded endpoint.

Seen (a new user's trial, `make run`): four concurrent heavy SELECTs of the password-less reader
held the endpoint's four query threads until their 60 s limit; a `SELECT 1` from another client
took 58 s. A reader (or tenant analyst) now has at most threads - 1 statements under way; past
that it is refused at once with ClickHouse's TOO_MANY_SIMULTANEOUS_QUERIES (HTTP 429), and the
thread left over answers everyone else."""

from __future__ import annotations

import asyncio
import base64
import urllib.parse

import aiohttp
import pytest

from services.analytics import admin_password
from tests.conftest import eventually
from tests.integration.conftest import System

pytestmark = pytest.mark.integration

# A reader's statement is run as the engine formats it (comments dropped): the constant marks it.
HEAVY = "SELECT count() FROM numbers(100000000000) WHERE sipHash64(number) = 7774441"


def _url(system: System, sql: str, **params: str) -> str:
    query = urllib.parse.urlencode({"query": sql, **params})
    return f"http://{system.settings.analytics_listen}/?{query}"


@pytest.mark.timeout(180)
async def test_a_reader_gets_too_many_simultaneous_queries_and_others_are_still_answered(
    system: System,
) -> None:
    admin_auth = {
        "Authorization": "Basic "
        + base64.b64encode(f"admin:{admin_password(system.settings)}".encode()).decode()
    }
    reader = {"X-ClickHouse-User": "default"}
    async with aiohttp.ClientSession() as heavy_session, aiohttp.ClientSession() as other:

        async def heavy() -> tuple[int, str]:
            async with heavy_session.get(
                _url(system, HEAVY, max_execution_time="50"), headers=reader
            ) as resp:
                return resp.status, await resp.text()

        async def running() -> int:
            sql = "SELECT count() FROM system.processes WHERE query LIKE '%7774441%' AND query NOT LIKE '%system.processes%'"
            async with other.get(_url(system, sql), headers=admin_auth) as resp:
                return int((await resp.text()).strip() or 0)

        first = [asyncio.ensure_future(heavy()) for _ in range(3)]
        try:
            await eventually(
                running, lambda n: n >= 3, within_s=30, what="three heavy reader statements running"
            )
            # The reader's fourth: refused at once, not queued behind its own three.
            async with other.get(
                _url(system, HEAVY), headers=reader, timeout=aiohttp.ClientTimeout(total=15)
            ) as resp:
                body = await resp.text()
                assert resp.status == 429 and resp.headers.get("X-ClickHouse-Exception-Code") == "202", body
                assert "TOO_MANY_SIMULTANEOUS_QUERIES" in body
            # Another client is answered while they run (Grafana, `switchboard sql`, the report).
            async with other.get(
                _url(system, "SELECT 1"), headers=admin_auth, timeout=aiohttp.ClientTimeout(total=15)
            ) as resp:
                assert (resp.status, (await resp.text()).strip()) == (200, "1")
            assert not any(task.done() for task in first), "the heavy statements ended before the check"
        finally:
            for task in first:
                task.cancel()
            await asyncio.gather(*first, return_exceptions=True)
    # Hung up: their statements are stopped and the reader's slots are free again.
    async with aiohttp.ClientSession() as session:

        async def reader_answered() -> int:
            async with session.get(_url(system, "SELECT 1"), headers=reader) as resp:
                return resp.status

        await eventually(
            reader_answered, lambda status: status == 200, within_s=60, what="the reader's slots freed"
        )
