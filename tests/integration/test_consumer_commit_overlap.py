"""A batch's Kafka commit overlaps the next batch, and still only follows what was applied.

The sessions worker waited for Kafka's answer to each commit (~7 ms of a 35 ms batch of 500 in a
catch-up) before it fetched the next batch. The BatchConsumer now starts the commit and goes on;
it waits for it before the next commit, before it idles, before partitions are revoked and before
`run` returns. Here Kafka's commits are slowed (each waits COMMIT_DELAY_S, then is sent) to see
each of those waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
from aiokafka import TopicPartition

from services.settings import Settings
from streams._consumer import BatchConsumer, Record, Rejected
from tests.integration.conftest import eventually
from tests.integration.consumer_rig import Collect, fresh_topic, running_consumer, send_all, started_producer

pytestmark = pytest.mark.integration

COMMIT_DELAY_S = 1.0


class Timed(Collect):
    """Collect, with when each batch began and when each revocation came; a batch waits for
    `hold` while it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_began: list[float] = []
        self.revoked_at: list[float] = []
        self.hold: asyncio.Event | None = None

    async def process(self, records: Sequence[Record]) -> Rejected:
        self.batch_began.append(time.monotonic())
        if self.hold is not None:
            await self.hold.wait()
        return await super().process(records)

    async def on_revoked(self, partitions: set[int]) -> None:
        self.revoked_at.append(time.monotonic())


class SlowCommits:
    """Wraps a Kafka consumer's `commit`: each waits COMMIT_DELAY_S, then commits. Records, per
    commit, the offset it committed, how many records were applied when it began, and when Kafka
    had confirmed it."""

    def __init__(self, consumer: BatchConsumer, processor: Collect) -> None:
        assert consumer._consumer is not None
        self._real = consumer._consumer.commit
        self._processor = processor
        self.commits: list[tuple[int, int, float]] = []
        consumer._consumer.commit = self

    async def __call__(self, offsets: dict[TopicPartition, int]) -> None:
        applied = len(self._processor.values)
        await asyncio.sleep(COMMIT_DELAY_S)
        await self._real(offsets)
        (offset,) = offsets.values()
        self.commits.append((offset, applied, time.monotonic()))


async def _committed(settings: Settings, consumer: BatchConsumer) -> int | None:
    assert consumer._consumer is not None
    return await consumer._consumer.committed(TopicPartition(settings.conversation_topic, 0))


@pytest.mark.timeout(120)
async def test_the_next_batch_is_applied_while_a_commit_is_under_way_and_nothing_unapplied_is_committed(
    local_stack: Settings,
) -> None:
    settings = await fresh_topic(local_stack, "commitoverlap")
    processor = Timed()
    values = [f"v-{i}".encode() for i in range(10)]
    async with started_producer(settings) as producer:
        # All there before the consumer starts: two batches of five, one right after the other.
        await send_all(producer, settings.conversation_topic, values)
    async with running_consumer(settings, processor, "commitoverlap", batch_size=5) as rig:
        slow = SlowCommits(rig.consumer, processor)
        await eventually(rig.applied, lambda v: v == values, within_s=30, what="both batches")
        await eventually(
            lambda: asyncio.sleep(0, slow.commits),
            lambda c: bool(c) and c[-1][0] == 10,
            within_s=30,
            what="the commit of every record",
        )
        # The second batch began while the first one's commit (COMMIT_DELAY_S) was under way.
        assert len(processor.batch_began) == 2, processor.batch_began
        assert [offset for offset, _, _ in slow.commits] == [5, 10], slow.commits
        assert processor.batch_began[1] < slow.commits[0][2], (processor.batch_began, slow.commits)
        # Never ahead of what was applied when the commit began.
        for offset, applied, _ in slow.commits:
            assert offset <= applied, slow.commits
        assert await _committed(settings, rig.consumer) == 10


@pytest.mark.timeout(120)
async def test_a_stop_and_a_revocation_wait_for_the_last_commit(local_stack: Settings) -> None:
    settings = await fresh_topic(local_stack, "commitlast")
    processor = Timed()
    async with (
        started_producer(settings) as producer,
        running_consumer(settings, processor, "commitlast") as rig,
    ):
        slow = SlowCommits(rig.consumer, processor)
        values = [f"v-{i}".encode() for i in range(5)]
        await send_all(producer, settings.conversation_topic, values)
        await eventually(rig.applied, lambda v: v == values, within_s=30, what="the batch")
        # Its commit is under way (COMMIT_DELAY_S): the revocation of the partition waits for it.
        await rig.consumer._revoked({0})
        assert slow.commits and slow.commits[-1][0] == 5, slow.commits
        assert processor.revoked_at and slow.commits[-1][2] <= processor.revoked_at[-1]

        # Stopped with a batch in hand: it is applied, and `run` returns once its commit is in.
        processor.hold = asyncio.Event()
        began = len(processor.batch_began)
        more = [f"w-{i}".encode() for i in range(3)]
        await send_all(producer, settings.conversation_topic, more)
        await eventually(
            lambda: asyncio.sleep(0, len(processor.batch_began)),
            lambda n: n > began,
            within_s=30,
            what="the next batch in hand",
        )
        await rig.consumer.stop()
        processor.hold.set()
        await asyncio.wait_for(rig.task, 10)
        # The batch in hand was applied (the three records, or the first of them), then committed.
        in_hand = len(processor.values) - 5
        assert in_hand >= 1 and processor.values[5:] == more[:in_hand], processor.values
        assert slow.commits[-1][0] == 5 + in_hand, slow.commits
        assert await _committed(settings, rig.consumer) == 5 + in_hand
