"""The stall watchdog: a consumer whose Kafka client stopped returning records is started again.

aiokafka fetches in a background task and `getmany` only reads what that task buffered. When the
task ends (aio-libs/aiokafka#983: it swallows a cancellation and finishes without a word), every
poll returns nothing, forever, with records waiting: a processor that looks alive and applies
nothing. Here the fetch task is ended the way that issue describes (and, for any other way a
client stops fetching, its partitions are paused), and what is produced after it must still be
applied, once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from services.settings import Settings
from streams import _consumer
from tests.integration.conftest import eventually
from tests.integration.consumer_rig import Collect, fresh_topic, running_consumer, send_all, started_producer

pytestmark = pytest.mark.integration


async def _stall_and_recover(settings: Settings, fault: str) -> None:
    """Apply 20 records, inject `fault` into the consumer, produce 20 more: all 40 must be applied,
    once, in order, after exactly one restart."""
    async with started_producer(settings) as producer, running_consumer(settings, Collect(), "stall") as rig:
        before = [f"before-{i}".encode() for i in range(20)]
        await send_all(producer, settings.conversation_topic, before)
        await eventually(rig.applied, lambda v: v == before, within_s=60, what="records before the fault")
        kafka = rig.consumer._consumer
        assert kafka is not None
        if fault == "fetch task ended":
            # The fault of aiokafka#983: the fetch task ends, and nothing says so.
            fetch_task = kafka._fetcher._fetch_task
            fetch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fetch_task
            assert fetch_task.done() and not fetch_task.cancelled()  # it swallowed the cancellation
        elif fault == "coordination ended":
            # Seen in a soak: a write to a transport a Kafka restart had closed raised uvloop's
            # RuntimeError inside aiokafka's coordination routine, which ended for good; every
            # poll raises it from then on and nothing heartbeats.
            coordinator = kafka._coordinator

            async def closed_transport() -> None:
                raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

            coordinator.ensure_coordinator_known = closed_transport
            coordinator.coordinator_dead()
        else:
            # Any other way a client stops fetching with records waiting: polls return nothing.
            kafka.pause(*kafka.assignment())
        after = [f"after-{i}".encode() for i in range(20)]
        await send_all(producer, settings.conversation_topic, after)
        await eventually(
            rig.applied, lambda v: v == before + after, within_s=60, what=f"records after the fault ({fault})"
        )
        assert rig.consumer.stats.restarts == 1


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", ["fetch task ended", "partitions not fetched", "coordination ended"])
async def test_a_consumer_that_stopped_fetching_is_started_again(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    # Shorter bounds than production's, so the test takes seconds; the logic is the same. A
    # coordination that ended is seen at once, not by records waiting past the bound.
    monkeypatch.setattr(_consumer, "STALL_CHECK_EVERY_S", 0.5)
    monkeypatch.setattr(_consumer, "STALL_BOUND_S", 600.0 if fault == "coordination ended" else 2.0)
    await _stall_and_recover(await fresh_topic(local_stack, "stall"), fault)
