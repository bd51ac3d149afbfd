"""Every processor begins reading the erasure registry when it starts, not inside its first batch.

Found by review: the sessions worker began the read at start-up (ErasureFollower.begin), while the
projector, the archiver and the assistant began it lazily in process(), so their first batch
after a start always waited for a whole read of the privacy topic (and, with Kafka slow, was
refused as an outage until it finished). Here each runs on a topic of its own with no record at
all: the registry must be read all the same.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from services.settings import Settings
from streams._consumer import Processor
from streams.archive._archiver import ArchiverProcessor
from streams.archive._store import ArchiveStore
from streams.assistant._worker import AssistantProcessor
from streams.privacy.erasures import ErasureFollower
from streams.projector import ProjectorProcessor
from tests.integration.conftest import eventually
from tests.integration.consumer_rig import fresh_topic, running_consumer

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
    settings = await fresh_topic(local_stack, "begin")
    follower = ErasureFollower(settings)
    try:
        processor = PROCESSORS[role](settings, follower)
        async with running_consumer(settings, processor, f"begin-{role}", batch_size=16, static=False) as rig:

            async def read() -> bool:
                rig.alive()
                return follower.ready

            await eventually(
                read, bool, within_s=60, what=f"the {role}'s erasure registry read with no record"
            )
            assert rig.consumer.stats.batches == 0
    finally:
        await follower.stop()
