"""A batch's commit runs as a task that `_run` and a revocation may both wait for (review,
twenty-first session): a commit that failed with an error of ours must not make the revocation
skip `on_revoked` (aiokafka logs and swallows a listener's exception) and is raised in `_run`
once; a revocation listener that is cancelled must not cancel the commit under `_run`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.settings import Settings
from streams._consumer import BatchConsumer, Record


class _Processor:
    name = "demo"

    def __init__(self) -> None:
        self.revoked: list[set[int]] = []

    async def on_revoked(self, partitions: set[int]) -> None:
        self.revoked.append(partitions)


class _Kafka:
    """What `_commit` uses of the consumer: a commit that takes a while, then answers or raises."""

    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.committed: list[Any] = []

    async def commit(self, offsets: Any) -> None:
        await asyncio.sleep(0.1)
        if self.error is not None:
            raise self.error
        self.committed.append(offsets)

    def assignment(self) -> set[Any]:
        return set()


def _consumer(kafka: _Kafka) -> tuple[BatchConsumer, _Processor]:
    processor = _Processor()
    consumer = BatchConsumer(Settings(), processor, topic="t", group_id="g", batch_size=10)  # type: ignore[arg-type]
    consumer._consumer = kafka
    consumer.stats.position[0] = 6
    consumer._committing = asyncio.ensure_future(consumer._commit([Record("t", 0, 5, None, b"", 0)]))
    return consumer, processor


async def test_a_commit_failing_with_our_error_still_revokes_and_is_raised_in_run_once() -> None:
    consumer, processor = _consumer(_Kafka(RuntimeError("an error the commit does not classify")))
    await consumer._revoked({0})  # aiokafka's listener: an exception here would be swallowed
    assert processor.revoked == [{0}]
    assert 0 not in consumer.stats.position
    with pytest.raises(RuntimeError, match="does not classify"):
        await consumer._commit_done()  # `_run`'s next wait
    assert await consumer._commit_done() is True  # once


async def test_a_cancelled_revocation_does_not_cancel_the_commit_under_run() -> None:
    kafka = _Kafka(None)
    consumer, _ = _consumer(kafka)
    commit = consumer._committing
    assert commit is not None
    listener = asyncio.ensure_future(consumer._revoked({0}))
    await asyncio.sleep(0.02)
    listener.cancel()  # aiokafka's coordination task cancelled (its close() cancelled)
    await asyncio.gather(listener, return_exceptions=True)
    assert await consumer._commit_done() is True
    assert not commit.cancelled()
    assert len(kafka.committed) == 1
