"""The sessions worker takes its partitions after a failed first look at Redis that is no outage.

`on_assigned` reads each partition's position from Redis and, where Redis has none (it lost its
data), starts a rebuild and shuts the write gate until it is done. It retried outages and let any
other error through (a Redis error reply such as MISCONF, when Redis cannot persist, or OOM);
aiokafka runs it as a rebalance listener and only logs what it raises, so the partitions were
folded from Kafka's committed offset with no rebuild, and the gate was never opened again: the
ingress refused every write as "the hot view is being rebuilt", for good, while the worker looked
alive. Real Kafka and Redis (a database of the test's own); the error is redis-py's own
ResponseError, raised once where the worker reads the positions.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from switchboard.v1 import events_pb2

from schemas import hotview as hv
from schemas.events import new_event
from services.settings import Settings
from streams.sessions._worker import SessionsProcessor
from tests.conftest import eventually
from tests.integration.consumer_rig import running_consumer
from tests.integration.test_sessions_redis_loss import PARTITIONS, own_log, produce

pytestmark = pytest.mark.integration


class RefusedOnce(SessionsProcessor):
    refusals = 1

    async def _positions(self, partitions: set[int]) -> dict[int, int]:
        if self.refusals:
            self.refusals -= 1
            raise ResponseError(
                "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk"
            )
        return await super()._positions(partitions)


@pytest.mark.timeout(180)
async def test_partitions_whose_first_position_read_was_refused_are_rebuilt_and_opened(
    local_stack: Settings,
) -> None:
    async with own_log(local_stack, db=13) as (settings, redis):
        events = [
            (p, new_event("assign", f"c{p}-{i}", conversation_started=events_pb2.ConversationStarted()))
            for p in range(PARTITIONS)
            for i in range(5)
        ]
        await produce(settings, events)
        worker_redis = aioredis.Redis.from_url(settings.redis_url)
        processor = RefusedOnce(settings, worker_redis)
        try:
            async with running_consumer(
                settings, processor, "assign", batch_size=settings.batch_size, static=False, stop_within_s=30
            ) as rig:

                async def gate() -> int:
                    rig.alive()
                    return int(await redis.hlen(hv.READY_KEY))

                await eventually(
                    gate,
                    lambda ready: ready == PARTITIONS,
                    within_s=60,
                    what="every partition's write gate open again",
                )
                assert processor.refusals == 0
        finally:
            await worker_redis.aclose()
