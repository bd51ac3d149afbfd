"""The rate limiter after its Redis connections are dropped (a Redis restart, a proxy's idle
timeout): the next check is charged, not let through unchecked."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from services.auth._limits import LIMITER_CLIENT_NAME, Limit, Plan, RateLimiter
from tests.integration.conftest import System

pytestmark = pytest.mark.integration


async def test_a_dropped_connection_is_retried_not_failed_open(system: System) -> None:
    # Redis restarted (or a proxy closed idle connections): every pooled connection of the
    # limiter was dead, and the next call on each failed and was let through unchecked (fail
    # open): a tenant at its limit got a free call per pooled connection after every restart.
    settings = system.settings.model_copy(update={"rate_limit_timeout_s": 2.0})
    limiter = RateLimiter(settings)
    admin = aioredis.Redis.from_url(settings.redis_url)
    plan = Plan((f"rl-reconnect:{id(limiter)}",), (Limit(rate=0.001, burst=3),), ("tenant 'reconnect'",))
    fail_open = "switchboard_rate_limit_fail_open_total"
    try:
        assert await limiter.acquire(plan, 1, 1) == 1  # the pool now holds a connection
        mine = [c for c in await admin.client_list() if c.get("name") == LIMITER_CLIENT_NAME]
        assert mine, "the limiter's connection does not carry its name"
        before = REGISTRY.get_sample_value(fail_open) or 0.0
        for client in mine:
            await admin.client_kill_filter(_id=client["id"])
        assert await limiter.acquire(plan, 1, 1) == 1
        assert await limiter.acquire(plan, 1, 1) == 1
        assert REGISTRY.get_sample_value(fail_open) == before, "a check after the drop failed open"
        # The bucket was charged by all three: the fourth is refused.
        refused = await limiter.acquire(plan, 1, 1)
        assert not isinstance(refused, int), "the checks after the drop were not charged"
    finally:
        await limiter.close()
        await admin.aclose()
