"""Hostile review s23 of TickPipeline (94fd2f5, 2ebed60): each test shows a finding."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from services.ingress._hotview import TickPipeline
from tests.integration.test_tick_pipeline import _commands, client, redis_server  # noqa: F401

pytestmark = pytest.mark.integration


async def test_review_s23_a_later_waiter_with_a_shorter_bound_is_sent_within_it(
    client: aioredis.Redis,  # noqa: F811
) -> None:
    tick = TickPipeline(client)
    try:
        slow = tick.run(_commands(("SET", "a", "1")), 1, within_s=3600)
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        quick = tick.run(_commands(("SET", "b", "1")), 1, within_s=0.01)
        done, _ = await asyncio.wait({quick}, timeout=1.0)
        assert quick in done, f"waited {time.monotonic() - t0:.2f}s past its 0.01s bound"
        assert slow is not None
    finally:
        await tick.close()


class _Boom(BaseException):
    pass


async def test_review_s23_a_callback_raising_a_base_exception_leaves_no_other_future_pending(
    client: aioredis.Redis,  # noqa: F811
) -> None:
    tick = TickPipeline(client)

    def bad(pipe: object) -> None:
        raise _Boom()

    try:
        good = tick.run(_commands(("SET", "g", "1")), 1)
        boom = tick.run(bad, 1)
        done, _ = await asyncio.wait({good, boom}, timeout=2.0)
        assert good in done, "a caller sharing the tick with a raising callback never got an answer"
    finally:
        # Retrieved: asyncio logging "exception was never retrieved" with its traceback leaves
        # CPython 3.11.7's recursion counter off, and pytest's next compile in this process fails
        # "AST constructor recursion depth mismatch".
        await asyncio.gather(good, boom, return_exceptions=True)
        await tick.close()


async def test_review_s23_a_cancelled_close_still_closes_the_kept_connections(
    client: aioredis.Redis,  # noqa: F811
) -> None:
    tick = TickPipeline(client)
    # Two kept connections (overlapping round trips).
    await asyncio.gather(tick.run(_commands(("PING",)), 1))
    f1 = tick.run(_commands(("PING",)), 1)
    await asyncio.sleep(0)
    f2 = tick.run(_commands(("PING",)), 1)
    await asyncio.gather(f1, f2)
    assert tick._open >= 1
    waiting = tick.run(_commands(("SET", "w", "1")), 1, within_s=3600)
    closing = asyncio.ensure_future(tick.close())
    await asyncio.sleep(0)  # close() is now awaiting the round trip of what waited
    closing.cancel()
    await asyncio.gather(closing, return_exceptions=True)
    await asyncio.gather(waiting, return_exceptions=True)
    assert tick._open == 0 and not tick._idle, (
        f"after a cancelled close(): {tick._open} connections counted open, {len(tick._idle)} kept"
    )
