"""Every processor begins reading the erasure registry when it starts, not inside its first batch.

Found by review: the sessions worker began the read at start-up (ErasureFollower.begin), while the
projector, the archiver and the assistant began it lazily in process(), so their first batch
after a start always waited for a whole read of the privacy topic (and, with Kafka slow, was
refused as an outage until it finished). Here each runs on a topic of its own with no record at
all: the registry must be read all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from services.kafka_topics import ensure_topics
from services.settings import Settings
from streams._consumer import BatchConsumer, Processor
from streams.archive._archiver import ArchiverProcessor
from streams.archive._store import ArchiveStore
from streams.assistant._worker import AssistantProcessor
from streams.privacy.erasures import ErasureFollower
from streams.projector import ProjectorProcessor
from tests.integration.conftest import eventually

pytestmark = pytest.mark.integration

_unused: Any = None
# What each processor needs besides its follower; nothing of it is used before a record comes.
PROCESSORS: dict[str, Callable[[Settings, ErasureFollower], Processor]] = {
    "projector": lambda settings, follower: ProjectorProcessor(None, follower),
    "archiver": lambda settings, follower: ArchiverProcessor(
        settings,
        ArchiveStore(settings, prefix=f"begin-{uuid.uuid4().hex[:8]}"),
        settings.conversation_topic,
        follower,
    ),
    "assistant": lambda settings, follower: AssistantProcessor(
        settings, _unused, _unused, _unused, _unused, _unused, follower
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("role", sorted(PROCESSORS))
async def test_a_started_processor_reads_the_erasure_registry_before_any_record(
    local_stack: Settings, role: str
) -> None:
    settings = local_stack.model_copy(update={"conversation_topic": f"begin-{uuid.uuid4().hex[:8]}"})
    await ensure_topics(settings)
    follower = ErasureFollower(settings)
    processor = PROCESSORS[role](settings, follower)
    consumer = BatchConsumer(
        settings,
        processor,
        topic=settings.conversation_topic,
        group_id=f"begin-{role}-{uuid.uuid4().hex[:8]}",
        batch_size=16,
    )
    await consumer.start()
    running = asyncio.ensure_future(consumer.run())

    async def read() -> bool:
        assert not running.done(), running
        return follower.ready

    try:
        await eventually(read, bool, within_s=60, what=f"the {role}'s erasure registry read with no record")
        assert consumer.stats.batches == 0
    finally:
        await consumer.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 10)
        await consumer.close()
        await follower.stop()
