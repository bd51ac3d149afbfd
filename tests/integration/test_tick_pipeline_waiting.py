"""Settlements that wait for company (TickPipeline.run's within_s): the races a review of
9f27454 found. Each test failed on that commit."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from schemas import hotview as hv
from services.ingress._hotview import HeldClaim, IngressHotView, TickPipeline
from services.ingress._producer import Ack
from tests.conftest import eventually
from tests.integration.test_tick_pipeline import _commands, client, redis_server  # noqa: F401

pytestmark = pytest.mark.integration


async def _until_settled(redis: aioredis.Redis, held: HeldClaim) -> None:
    await eventually(
        lambda: redis.get(held.redis_key), lambda v: v != held.marker, within_s=5, what="the settle"
    )


async def _known_but_not_loaded(redis: aioredis.Redis, tick: TickPipeline, script: str) -> str:
    """The script's SHA1: known to the pipeline, absent from Redis (its EVALSHA answers NOSCRIPT)."""
    sha = await redis.script_load(script)
    await redis.script_flush()
    tick.scripts[sha] = script
    return str(sha)


async def test_review_s22_waiting_and_queued_commands_of_one_tick_go_in_issue_order(
    client: aioredis.Redis,  # noqa: F811
) -> None:
    """A command queued (no wait) before a waiting one in the same tick is sent before it."""
    tick = TickPipeline(client)
    try:
        first = tick.run(_commands(("SET", "o", "first")), 1)  # issued first, no wait
        second = tick.run(_commands(("SET", "o", "second")), 1, within_s=0.004)  # issued second
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert await client.get("o") == b"second", "the waiting command was sent before an earlier one"
    finally:
        await tick.close()


async def test_review_s22_close_returns_only_once_what_waited_was_sent(
    client: aioredis.Redis,  # noqa: F811
) -> None:
    """close() returns once what waited was sent: a caller that stops the loop (or the process)
    right after it loses nothing."""
    tick = TickPipeline(client)
    waiting = tick.run(_commands(("SET", "c", "1")), 1, within_s=3600)
    await tick.close()
    try:
        assert waiting.done(), "close() returned before the waiting command was sent"
    finally:
        await asyncio.wait_for(waiting, 5)


async def test_review_s22_a_cancelled_waiter_still_has_its_settle_sent(
    client: aioredis.Redis,  # noqa: F811
) -> None:
    hot = IngressHotView(client, 3600)
    held = HeldClaim("t", "c1", "m1", b"pending:x", in_flight=True)
    await client.set(held.redis_key, held.marker)
    await client.zadd(held.in_flight_key, {held.in_flight_member: 0})
    try:
        task = asyncio.ensure_future(hot.settle_many([(held, Ack("e1", 0, 7))], within_s=0.004))
        await asyncio.sleep(0)
        task.cancel()
        await _until_settled(client, held)
        assert await client.get(held.redis_key) == hv.encode_claim("e1", 0, 7).encode()
        assert await client.zcard(held.in_flight_key) == 0
    finally:
        await hot.close()


async def test_review_s22_a_waiting_settle_after_script_flush_falls_back_and_lands(
    client: aioredis.Redis,  # noqa: F811
) -> None:
    hot = IngressHotView(client, 3600)
    held = HeldClaim("t", "c2", "m2", b"pending:y", in_flight=True)
    await client.set(held.redis_key, held.marker)
    await client.zadd(held.in_flight_key, {held.in_flight_member: 0})
    await client.script_flush()
    try:
        await asyncio.wait_for(hot.settle_many([(held, Ack("e2", 1, 3))], within_s=0.004), 5)
        assert await client.get(held.redis_key) == hv.encode_claim("e2", 1, 3).encode()
        assert await client.zcard(held.in_flight_key) == 0
    finally:
        await hot.close()


async def test_review_s22_a_waiting_settle_is_failed_by_another_callers_bad_round_trip(
    client: aioredis.Redis,  # noqa: F811
) -> None:
    """A waiting settle rides with whatever round trip comes next; another caller's argument
    that cannot be packed fails that caller alone."""
    hot = IngressHotView(client, 3600)
    held = HeldClaim("t", "c3", "m3", b"pending:z", in_flight=True)
    await client.set(held.redis_key, held.marker)
    try:
        settle = asyncio.ensure_future(hot.settle_many([(held, Ack("e3", 0, 1))], within_s=0.004))
        await asyncio.sleep(0)
        bad = hot._tick.run(_commands(("SET", "k", object())), 1)
        results = await asyncio.gather(settle, bad, return_exceptions=True)
        assert not isinstance(results[0], Exception), (
            f"the settle failed with another's error: {results[0]!r}"
        )
    finally:
        await hot.close()


async def test_review_s22_a_cancelled_waiter_still_has_its_settle_sent_once_the_script_is_loaded(
    client: aioredis.Redis,  # noqa: F811
) -> None:
    """As a_cancelled_waiter_still_has_its_settle_sent, the settle script already loaded."""
    hot = IngressHotView(client, 3600)
    await client.script_load(hot._settle_script.script)
    held = HeldClaim("t", "c4", "m4", b"pending:w", in_flight=True)
    await client.set(held.redis_key, held.marker)
    await client.zadd(held.in_flight_key, {held.in_flight_member: 0})
    try:
        task = asyncio.ensure_future(hot.settle_many([(held, Ack("e4", 0, 9))], within_s=0.004))
        await asyncio.sleep(0)
        task.cancel()
        await _until_settled(client, held)
        assert await client.get(held.redis_key) == hv.encode_claim("e4", 0, 9).encode()
        assert await client.zcard(held.in_flight_key) == 0
    finally:
        await hot.close()


async def test_a_failed_script_reload_fails_only_the_calls_sent_again(
    client: aioredis.Redis,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round trip's replies stand when the calls it sends again after NOSCRIPT fail (Redis gone
    between the two): only those calls get the error."""
    tick = TickPipeline(client)
    script = "return 7"
    sha = await _known_but_not_loaded(client, tick, script)
    first_trip = tick._round_trip
    trips = 0

    async def second_fails(packed: bytes, count: int) -> list[object]:
        nonlocal trips
        trips += 1
        if trips == 2:
            raise ConnectionError("Redis went away")
        return await first_trip(packed, count)

    monkeypatch.setattr(tick, "_round_trip", second_fails)
    try:
        plain = tick.run(_commands(("SET", "r", "1")), 1)
        evalsha = tick.run(_commands(("EVALSHA", sha, 0)), 1)
        plain_replies, evalsha_replies = await asyncio.wait_for(asyncio.gather(plain, evalsha), 5)
        assert plain_replies == [b"OK"]
        assert isinstance(evalsha_replies[0], ConnectionError)
        assert trips == 2
    finally:
        await tick.close()


async def test_review_s23_a_cancelled_reload_answers_outcome_unknown_not_noscript(
    client: aioredis.Redis,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The round trip that sends an EVALSHA again after NOSCRIPT is cancelled once Redis ran it:
    its caller must not be told NOSCRIPT (a refusal: the claim path then skips dropping the claim
    the script made, and retries are refused as in flight until CLAIM_TTL_S), but an error whose
    outcome is unknown, a connection error, as for any round trip cut off after it was written."""
    tick = TickPipeline(client)
    script = "return redis.call('INCR', KEYS[1])"
    sha = await _known_but_not_loaded(client, tick, script)
    first_trip = tick._round_trip
    trips = 0
    resent = asyncio.Event()

    async def second_hangs_after_running(packed: bytes, count: int) -> list[object]:
        nonlocal trips
        trips += 1
        replies = await first_trip(packed, count)
        if trips == 2:
            resent.set()
            await asyncio.Event().wait()  # cut off after Redis ran it
        return replies

    monkeypatch.setattr(tick, "_round_trip", second_hangs_after_running)
    try:
        evalsha = tick.run(_commands(("EVALSHA", sha, 1, "ran")), 1)
        await asyncio.wait_for(resent.wait(), 5)
        assert await client.get("ran") == b"1"
        (running,) = tick._running
        running.cancel()
        (reply,) = await asyncio.wait_for(evalsha, 5)
        assert isinstance(reply, RedisConnectionError), f"a cancelled reload answered {reply!r}"
    finally:
        await tick.close()


async def test_review_s23_close_with_a_flush_due_sends_waiting_and_queued_as_one_round_trip(
    client: aioredis.Redis,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """close() called while a flush is due (a command queued in this tick) sends what waited and
    what was queued after it in one round trip, in the order issued; not on two connections at
    once, where Redis may run the later first."""
    tick = TickPipeline(client)
    real_trip = tick._round_trip
    trips: list[int] = []

    async def counted(packed: bytes, count: int) -> list[object]:
        trips.append(count)
        return await real_trip(packed, count)

    monkeypatch.setattr(tick, "_round_trip", counted)
    first = tick.run(_commands(("SET", "w", "first")), 1, within_s=3600)
    await asyncio.sleep(0)
    second = tick.run(_commands(("SET", "w", "second")), 1)  # a flush is now due
    try:
        await tick.close()
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert await client.get("w") == b"second"
        assert trips == [2], f"round trips of {trips} commands"
    finally:
        await tick.close()


def test_waiting_commands_on_uvloop_whose_timer_came_due_at_once(redis_server: Any) -> None:  # noqa: F811
    """Seen (ingress.log under `end_to_end.py --rate 1000 --api stream`, 16 times in 10 s):
    "recording 1 write outcomes failed (AttributeError("'uvloop.loop.Handle' object has no
    attribute 'when'")); retrying in the background". uvloop's call_at hands back a plain Handle,
    not a TimerHandle, when the delay rounds to 0 ms: a process descheduled for ~4 ms between
    `loop.time()` and `call_at` (a busy 2-core host) gets one. A second waiting command in that
    tick then failed (its settle retried, its queued copy sent as well). Run on uvloop, as the
    ingress is (services/eventloop.py); a wait under 0.5 ms makes the same Handle."""
    import uvloop

    async def scenario() -> list[Any]:
        redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/0")
        tick = TickPipeline(redis)
        try:
            first = tick.run(_commands(("SET", "u1", "1")), 1, within_s=0.0001)
            second = tick.run(_commands(("SET", "u2", "2")), 1, within_s=0.004)
            third = tick.run(_commands(("SET", "u3", "3")), 1, within_s=0.00001)
            await asyncio.wait_for(asyncio.gather(first, second, third), 5)
            return list(await redis.mget("u1", "u2", "u3"))
        finally:
            await tick.close()
            await redis.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario()) == [b"1", b"2", b"3"]
