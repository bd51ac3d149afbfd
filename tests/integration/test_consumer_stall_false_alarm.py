"""The stall watchdog does not start a healthy consumer again.

Found by review: the watchdog measured "no records returned" from the last batch's start or the
last check that saw nothing behind. A batch that took longer than the bound (a sink outage retried
for a while) or checks that could not reach Kafka (a broker restart) left that clock stale, so
the first check afterwards that saw a record produced a moment earlier, not returned yet (one that
arrived between an empty poll and the check), restarted a consumer that was fetching fine: a
revocation and a new member for nothing, after every such outage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from aiokafka import AIOKafkaProducer

from services.settings import Settings
from streams import _consumer
from streams._consumer import PartitionControl, Record, Rejected
from tests.integration.conftest import eventually
from tests.integration.consumer_rig import fresh_topic, running_consumer, started_producer

pytestmark = pytest.mark.integration

BOUND_S = 2.0


class SlowThenQuick:
    """Its first batch takes longer than the watchdog's bound (a sink coming back); at the first
    idle poll after it, a record arrives (produced, and in Kafka, before the watchdog looks)."""

    name = "stall-false-alarm"

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic
        self.values: list[bytes] = []
        self.late_sent = False

    async def on_assigned(self, partitions: set[int], consumer: PartitionControl) -> None:
        return None

    async def on_revoked(self, partitions: set[int]) -> None:
        return None

    async def idle(self, consumer: PartitionControl) -> None:
        if self.values and not self.late_sent:
            self.late_sent = True
            await self._producer.send_and_wait(self._topic, b"late", key=b"k")

    async def healthy(self) -> bool:
        return True

    async def process(self, records: Sequence[Record]) -> Rejected:
        if not self.values:
            await asyncio.sleep(BOUND_S * 1.5)
        self.values.extend(r.value or b"" for r in records)
        return []


@pytest.mark.timeout(120)
async def test_a_record_arriving_after_a_long_batch_does_not_restart_the_consumer(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_consumer, "STALL_CHECK_EVERY_S", 0.5)
    monkeypatch.setattr(_consumer, "STALL_BOUND_S", BOUND_S)
    settings = await fresh_topic(local_stack, "stallfa")
    async with (
        started_producer(settings) as producer,
        running_consumer(settings, SlowThenQuick(producer, settings.conversation_topic), "stallfa") as rig,
    ):
        await producer.send_and_wait(settings.conversation_topic, b"first", key=b"k")
        await eventually(rig.applied, lambda v: v == [b"first", b"late"], within_s=60, what="both records")
        # The check right after the late record's arrival (before it was returned) found it behind.
        assert rig.consumer.stats.restarts == 0
        assert rig.processor.values == [b"first", b"late"]
