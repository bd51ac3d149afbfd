"""A failed poll's pause, and an outage's retry of a batch, are bounded by 1 s: crash rehearsals saw
the sessions worker still sleeping 3.2 s (the back-off had doubled up to it) after its group had
synced following a Kafka restart, and after a restarted Redis had loaded its file: the hot view
that much later."""

from __future__ import annotations

from typing import Any

import redis.exceptions
from aiokafka.errors import GroupLoadInProgressError

from services.settings import Settings
from streams import _consumer
from streams._consumer import BatchConsumer


class FailingThenFine:
    """An aiokafka consumer whose polls fail `failures` times, then return nothing."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[Any, Any]:
        if self.failures:
            self.failures -= 1
            raise GroupLoadInProgressError()
        return {}


def recorded_pauses(consumer: BatchConsumer) -> list[float]:
    """The pauses `consumer` asks for, recorded instead of slept."""
    pauses: list[float] = []

    async def pause(seconds: float) -> bool:
        pauses.append(seconds)
        return True

    consumer._pause = pause  # type: ignore[method-assign]
    return pauses


class Processor:
    name = "test"


async def test_a_failing_poll_pauses_at_most_a_second_and_starts_again_small_after_a_success() -> None:
    consumer = BatchConsumer(Settings(), Processor(), topic="t", group_id="g", batch_size=10)  # type: ignore[arg-type]
    consumer._consumer = FailingThenFine(failures=10)
    pauses = recorded_pauses(consumer)
    for _ in range(11):
        assert await consumer._poll(timeout_ms=10, max_records=10) == {}
    assert pauses[:4] == [_consumer.RETRY_INITIAL_S, 0.4, 0.8, 1.0]
    assert max(pauses) == 1.0 and len(pauses) == 10
    consumer._consumer = FailingThenFine(failures=1)
    await consumer._poll(timeout_ms=10, max_records=10)
    assert pauses[-1] == _consumer.RETRY_INITIAL_S, "a poll that worked starts the back-off again"


class DownThenUp:
    """A processor whose store is down for `outages` batches (Redis loading its file)."""

    name = "test"

    def __init__(self, outages: int) -> None:
        self.outages = outages

    async def process(self, records: object) -> list[object]:
        if self.outages:
            self.outages -= 1
            raise redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory")
        return []


async def test_a_batch_failed_by_an_outage_is_retried_at_least_every_second() -> None:
    processor = DownThenUp(outages=10)
    consumer = BatchConsumer(Settings(), processor, topic="t", group_id="g", batch_size=10)  # type: ignore[arg-type]
    pauses = recorded_pauses(consumer)
    assert await consumer._apply_until_done([]) is True
    assert pauses[:4] == [_consumer.RETRY_INITIAL_S, 0.4, 0.8, 1.0]
    assert max(pauses) == 1.0 and len(pauses) == 10
