"""A consumer whose group join does not complete says so (log and metric), and reports nothing
applied meanwhile as the processor being fine.

Seen in a soak: after an unclean Kafka restart, the broker's group coordinator refused every join
of the projector's group (NOT_COORDINATOR) for minutes; the projector had no partition, applied
nothing and reported no lag (lag is per assigned partition), and nothing said so. Here the join
is held up by a broker that does not answer (SIGSTOP) while the consumer rejoins.
"""

from __future__ import annotations

import logging
import signal

import psutil
import pytest

from services import stack
from services.settings import Settings
from streams import _consumer
from tests.integration.conftest import eventually
from tests.integration.consumer_rig import Collect, fresh_topic, running_consumer

pytestmark = pytest.mark.integration


@pytest.mark.timeout(180)
async def test_a_join_that_does_not_complete_is_reported(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_consumer, "STALL_CHECK_EVERY_S", 0.2)
    monkeypatch.setattr(_consumer, "JOIN_BOUND_S", 1.0)
    settings = await fresh_topic(local_stack, "join")
    async with running_consumer(settings, Collect(), "join", batch_size=16) as rig:
        consumer = rig.consumer

        async def assigned() -> bool:
            rig.alive()
            return bool(consumer._consumer and consumer._consumer.assignment())

        broker = psutil.Process((await stack.status(local_stack))["kafka"]["pid"])
        await eventually(assigned, bool, within_s=60, what="the first assignment")
        assert consumer.stats.joining_since is None
        caplog.set_level(logging.ERROR, logger="streams._consumer")
        broker.send_signal(signal.SIGSTOP)
        try:
            assert consumer._consumer is not None
            consumer._consumer._coordinator.request_rejoin()

            async def reported() -> bool:
                return any("joining for" in r.getMessage() for r in caplog.records)

            # About a second here; over 30 s once in a loaded CI run (aiokafka's coordination
            # routine starts the rejoin when it next wakes), so the bound is generous.
            await eventually(reported, bool, within_s=75, what="the join reported as not completing")
            assert consumer.stats.joining_since is not None
        finally:
            broker.send_signal(signal.SIGCONT)

        async def rejoined() -> bool:
            return await assigned() and consumer.stats.joining_since is None

        await eventually(rejoined, bool, within_s=90, what="assigned again once Kafka answers")
