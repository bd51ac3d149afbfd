"""Idle close, one tenant at a time: a tenant whose sweep fails every time (its data in Redis is
not what the sweep expects) used to end every round of the sweeper, so the tenants after it were
never swept and their idle conversations stayed open."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from schemas import hotview as hv
from tests.conftest import System, eventually
from tests.integration.test_idle_close import conversation, sweeping  # noqa: F401
from tests.integration.test_ingress_guarantees import start
from tests.integration.test_quotas import create_tenant

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
async def test_a_tenant_whose_sweep_always_fails_does_not_stop_another_tenants_idle_close(
    system: System,
    sweeping: chat_pb2_grpc.ChatServiceStub,  # noqa: F811
    tenant: str,
) -> None:
    # Two broken tenants that sort before the healthy one (the sweep goes through them in order).
    wrong_type, corrupt = f"a{uuid.uuid4().hex[:10]}", f"b{uuid.uuid4().hex[:10]}"
    assert wrong_type < tenant and corrupt < tenant
    redis = aioredis.Redis.from_url(system.settings.redis_url)
    broken = [
        hv.activity_key(wrong_type),
        hv.activity_key(corrupt),
        hv.conversation_key(corrupt, "c1"),
    ]
    try:
        # The activity index of one is not a sorted set; the other's idle candidate has a state
        # that is not JSON. Both are due (the default idle time) and fail in every sweep.
        await redis.set(hv.activity_key(wrong_type), b"not a sorted set")
        await redis.zadd(hv.activity_key(corrupt), {"c1": 1})
        await redis.hset(hv.conversation_key(corrupt, "c1"), hv.F_STATE, b"{not json")
        await redis.sadd(hv.ACTIVE_TENANTS_KEY, wrong_type, corrupt)

        await create_tenant(system, tenant, "--idle-close-after", "2")
        cid = await start(sweeping, tenant)
        conv = await eventually(
            lambda: conversation(sweeping, tenant, cid),
            # Closed as soon as the close is durable (the registry); its resolution once the
            # sessions worker has folded the close (CI19 read it in between: '' then).
            lambda c: c.status == chat_pb2.CONVERSATION_STATUS_CLOSED and bool(c.resolution),
            within_s=60,
            what="the healthy tenant's idle conversation closed and folded",
        )
        assert conv.resolution == "idle"
        # The broken tenants are left as they were (nothing of theirs closed or dropped).
        assert await redis.get(hv.activity_key(wrong_type)) == b"not a sorted set"
        assert await redis.zscore(hv.activity_key(corrupt), "c1") == 1
    finally:
        await redis.srem(hv.ACTIVE_TENANTS_KEY, wrong_type, corrupt)
        await redis.delete(*broken)
        await redis.aclose()
