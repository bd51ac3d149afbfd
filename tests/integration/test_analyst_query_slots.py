"""Readers cannot take every query thread of the embedded endpoint: the last is the admin's.

Seen (a new user's trial, `make run`): four concurrent heavy SELECTs of the password-less reader
held the endpoint's four query threads until their 60 s limit, and every other statement waited
for them. Readers' and tenant analysts' statements now share all the threads but one, waiting for
one of those (as they waited for a thread before); the admin's statements (migrations, replays,
the operator's writes) always find the last."""

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
async def test_readers_leave_one_query_thread_to_the_admin(system: System) -> None:
    admin = {
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
            sql = (
                "SELECT count() FROM system.processes "
                "WHERE query LIKE '%7774441%' AND query NOT LIKE '%system.processes%'"
            )
            async with other.get(_url(system, sql), headers=admin) as resp:
                return int((await resp.text()).strip() or 0)

        # One more heavy statement than the threads readers may use (the endpoint has 4).
        statements = [asyncio.ensure_future(heavy()) for _ in range(4)]
        try:
            await eventually(
                running, lambda n: n >= 3, within_s=30, what="three heavy reader statements running"
            )
            # The admin is answered while they run; the fourth waits for a reader's thread.
            async with other.get(
                _url(system, "SELECT 1"), headers=admin, timeout=aiohttp.ClientTimeout(total=15)
            ) as resp:
                assert (resp.status, (await resp.text()).strip()) == (200, "1")
            assert await running() == 3
            assert not any(task.done() for task in statements), [t.result() for t in statements if t.done()]
        finally:
            for task in statements:
                task.cancel()
            await asyncio.gather(*statements, return_exceptions=True)
        # Hung up: their statements are stopped, not left running for nobody.
        await eventually(running, lambda n: n == 0, within_s=60, what="the abandoned statements stopped")
    async with aiohttp.ClientSession() as session:
        async with session.get(_url(system, "SELECT 1"), headers=reader) as resp:
            assert resp.status == 200
