"""Dead-lettering does not hang on a Kafka producer that stopped answering.

Seen in fresh-clone CI's soak (cycle 4, after Kafka's kill -9): the projector was dead-lettering
a poison record when Kafka went down; its dead-letter producer retried NotLeaderForPartition and
then its send never completed, nor failed. `_until_durable` waited on it without bound, so the
projector stood on that batch and "probes projected" stayed at 0 for 120 s. Here the first
dead-letter producer's sends never complete, as that one's did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.settings import Settings
from streams import _consumer
from streams._consumer import Record, Rejected
from tests.conftest import eventually
from tests.integration.consumer_rig import Collect, fresh_topic, running_consumer, send_all, started_producer

pytestmark = pytest.mark.integration


class RefusePoison(Collect):
    name = "dead-letter-hang-test"

    async def process(self, records: Sequence[Record]) -> Rejected:
        good = [r for r in records if r.value != b"poison"]
        self.values.extend(r.value or b"" for r in good)
        return [(r, ValueError("poison")) for r in records if r.value == b"poison"]


@pytest.mark.timeout(180)
async def test_a_dead_letter_producer_that_stopped_answering_is_replaced(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_consumer, "DEAD_LETTER_ATTEMPT_S", 2.0)
    settings = await fresh_topic(local_stack, "dlqhang")
    async with (
        started_producer(settings) as producer,
        running_consumer(settings, RefusePoison(), "dlqhang") as running,
    ):
        first = running.consumer._producer
        assert first is not None

        async def never(*args: object, **kwargs: object) -> None:
            await asyncio.Event().wait()

        first.send_and_wait = never
        await send_all(producer, settings.conversation_topic, [b"a", b"poison", b"b"])
        await eventually(
            running.applied, lambda v: v == [b"a", b"b"], within_s=60, what="the batch past its poison"
        )
        await eventually(
            lambda: asyncio.sleep(0, running.consumer.stats.dead_lettered),
            lambda n: n == 1,
            within_s=60,
            what="the poison dead-lettered by a new producer",
        )
        assert running.consumer._producer is not first
