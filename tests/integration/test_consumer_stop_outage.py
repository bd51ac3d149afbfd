"""A BatchConsumer stops promptly when asked while Kafka is down, and commits nothing it had not
finished.

Seen under `switchboard run` (tests/integration/test_runner_restarts.py): with Kafka killed,
`switchboard worker sessions` and `switchboard analytics` went on for the whole 20 s after SIGTERM
and were then killed, so a Ctrl-C during a Kafka outage took 22 s. The consumer's waits on Kafka
(its start, the poll that waits for the group join, a commit, dead-lettering, the clients' stops)
never looked at the stop request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
import uuid
from collections.abc import Sequence

import psutil
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from services import stack
from services.settings import Settings
from streams._consumer import BatchConsumer, Processor, Record, Rejected, _joining
from tests.conftest import eventually
from tests.integration.consumer_rig import Collect, fresh_topic, send_all, started_producer

pytestmark = pytest.mark.integration

# How long a stop may take, from `stop()` to `run()` returned (and, separately, to `close()`).
STOP_WITHIN_S = 5.0
HOLD = b"hold"


def _refused_bootstrap() -> str:
    """An address on 127.0.0.1 nothing listens on (a port the OS just handed out and took back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


async def _timed(what: str, awaitable: asyncio.Future[None], within_s: float) -> float:
    """Seconds `awaitable` took to end; fails (after cancelling it) past `within_s`."""
    started = time.monotonic()
    done, _ = await asyncio.wait({awaitable}, timeout=within_s)
    took = time.monotonic() - started
    if not done:
        awaitable.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(awaitable, 5)
        raise AssertionError(f"{what} did not end within {within_s:.0f}s of the stop")
    awaitable.result()
    return took


def _consumer(settings: Settings, processor: Processor, topic: str, group: str = "") -> BatchConsumer:
    """A consumer of `topic` in a group of its own (or `group`), with a static member id."""
    return BatchConsumer(
        settings,
        processor,
        topic=topic,
        group_id=group or f"stopout-{uuid.uuid4().hex[:8]}",
        instance_id=f"stopout-{uuid.uuid4().hex[:8]}",
        batch_size=16,
    )


@pytest.mark.timeout(60)
async def test_a_consumer_starting_against_a_refused_kafka_stops_when_asked(
    local_stack: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = local_stack.model_copy(update={"kafka_bootstrap": _refused_bootstrap()})
    consumer = _consumer(settings, Collect(), "stop-outage-unreachable")
    caplog.set_level(logging.WARNING, logger="streams._consumer")
    starting = asyncio.ensure_future(consumer.start())
    await eventually(
        lambda: asyncio.sleep(0, sum("not reachable yet" in r.getMessage() for r in caplog.records)),
        lambda n: n >= 2,
        within_s=20,
        what="the start retried against the refused port",
    )
    await consumer.stop()
    took = await _timed("start()", starting, STOP_WITHIN_S)
    # What run_until_signalled does next: run (returns at once) and close.
    took_run = await _timed("run()", asyncio.ensure_future(consumer.run()), STOP_WITHIN_S)
    took_close = await _timed("close()", asyncio.ensure_future(consumer.close()), STOP_WITHIN_S + 2)
    print(f"refused Kafka: start ended {took:.2f}s after stop, run {took_run:.2f}s, close {took_close:.2f}s")


class Held(Collect):
    """Applies what it is given at once, except a batch with a `HOLD` record: that one waits for
    `release`, then applies the rest and applies the HOLD record too, or refuses it (to be
    dead-lettered)."""

    name = "stop-outage-test"

    def __init__(self, refuse: bool) -> None:
        super().__init__()
        self.refuse = refuse
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.returned = asyncio.Event()

    async def process(self, records: Sequence[Record]) -> Rejected:
        if not any(r.value == HOLD for r in records):
            return await super().process(records)
        self.holding.set()
        await self.release.wait()
        refused = [r for r in records if self.refuse and r.value == HOLD]
        self.values.extend(r.value or b"" for r in records if r not in refused)
        self.returned.set()
        return [(r, ValueError("refused by the test")) for r in refused]


async def _committed(settings: Settings, group: str, tp: TopicPartition) -> int | None:
    """The group's committed offset; None when Kafka does not say (yet)."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    try:
        await reader.start()
        return await reader.committed(tp)
    except KafkaError:
        # Not answering yet after its restart: asked again.
        return None
    finally:
        await reader.stop()


@pytest.mark.timeout(90)
async def test_a_consumer_polling_while_kafka_is_down_stops_when_asked(local_stack: Settings) -> None:
    settings = await fresh_topic(local_stack, "stopout")
    processor = Collect()
    consumer = _consumer(settings, processor, settings.conversation_topic)
    await consumer.start()
    running = asyncio.ensure_future(consumer.run())
    kafka_down = False
    try:
        async with started_producer(settings) as producer:
            await send_all(producer, settings.conversation_topic, [b"a"])

            async def applied() -> list[bytes]:
                assert not running.done(), running
                return list(processor.values)

            await eventually(applied, lambda v: v == [b"a"], within_s=60, what="a record applied")
        await stack.stop_component(settings, "kafka", kill=True)
        kafka_down = True
        assert consumer._consumer is not None
        kafka = consumer._consumer

        # Once the consumer has noticed: its group coordinator is unknown.
        await eventually(
            lambda: asyncio.sleep(0, kafka._coordinator.coordinator_id),
            lambda c: c is None,
            within_s=40,
            what="the coordinator seen gone",
        )
        await consumer.stop()
        took_run = await _timed("run()", running, STOP_WITHIN_S)
        took_close = await _timed("close()", asyncio.ensure_future(consumer.close()), STOP_WITHIN_S + 2)
        print(f"Kafka killed (polling): run ended {took_run:.2f}s after stop, close {took_close:.2f}s")
    finally:
        if not running.done():
            await consumer.stop()
            running.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(running, 10)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(consumer.close(), 20)
        if kafka_down:
            await stack.start_component(settings, "kafka")


@pytest.mark.timeout(90)
async def test_a_consumer_waiting_for_its_group_join_stops_when_asked(local_stack: Settings) -> None:
    """aiokafka's getmany waits, without bound, for a group join under way; here the join cannot
    complete because the broker does not answer (SIGSTOP) while the consumer rejoins."""
    settings = await fresh_topic(local_stack, "stopout")
    processor = Collect()
    consumer = _consumer(settings, processor, settings.conversation_topic)
    await consumer.start()
    running = asyncio.ensure_future(consumer.run())
    broker = psutil.Process((await stack.status(local_stack))["kafka"]["pid"])
    try:
        async with started_producer(settings) as producer:
            await send_all(producer, settings.conversation_topic, [b"a"])

            async def applied() -> list[bytes]:
                assert not running.done(), running
                return list(processor.values)

            await eventually(applied, lambda v: v == [b"a"], within_s=60, what="a record applied")
        assert consumer._consumer is not None
        kafka = consumer._consumer
        broker.send_signal(signal.SIGSTOP)
        kafka._coordinator.request_rejoin()
        await eventually(lambda: asyncio.sleep(0, _joining(kafka)), bool, within_s=20, what="the rejoin")
        await consumer.stop()
        took_run = await _timed("run()", running, STOP_WITHIN_S)
        took_close = await _timed("close()", asyncio.ensure_future(consumer.close()), STOP_WITHIN_S + 2)
        print(f"Kafka not answering (joining): run ended {took_run:.2f}s after stop, close {took_close:.2f}s")
    finally:
        broker.send_signal(signal.SIGCONT)
        if not running.done():
            await consumer.stop()
            running.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(running, 10)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(consumer.close(), 20)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("refuse", [False, True], ids=["committing", "dead-lettering"])
async def test_a_stop_while_kafka_is_down_ends_promptly_and_commits_nothing_unfinished(
    local_stack: Settings, refuse: bool
) -> None:
    settings = await fresh_topic(local_stack, "stopout")
    processor = Held(refuse)
    group = f"stopout-{uuid.uuid4().hex[:8]}"
    consumer = _consumer(settings, processor, settings.conversation_topic, group)
    await consumer.start()
    running = asyncio.ensure_future(consumer.run())
    kafka_down = False
    try:
        first = [str(i).encode() for i in range(10)]
        async with started_producer(settings) as producer:
            await send_all(producer, settings.conversation_topic, first)

            async def applied() -> list[bytes]:
                assert not running.done(), running
                return list(processor.values)

            await eventually(applied, lambda v: v == first, within_s=60, what="the first records applied")
            (partition,) = consumer.stats.position
            tp = TopicPartition(settings.conversation_topic, partition)
            assert consumer._control is not None
            control = consumer._control
            await eventually(
                lambda: control.committed(partition), lambda o: o == 10, within_s=30, what="them committed"
            )
            await send_all(producer, settings.conversation_topic, [HOLD])
        await asyncio.wait_for(processor.holding.wait(), 30)
        # The batch in hand when Kafka dies: it finishes, but neither its commit nor its dead
        # letter can reach Kafka.
        await stack.stop_component(settings, "kafka", kill=True)
        kafka_down = True
        processor.release.set()
        await asyncio.wait_for(processor.returned.wait(), 5)
        await consumer.stop()
        took_run = await _timed("run()", running, STOP_WITHIN_S)
        took_close = await _timed("close()", asyncio.ensure_future(consumer.close()), STOP_WITHIN_S + 2)
        print(
            f"Kafka killed ({'dead-lettering' if refuse else 'committing'}): run ended {took_run:.2f}s after stop, close {took_close:.2f}s"
        )
    finally:
        if not running.done():
            await consumer.stop()
            running.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(running, 10)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(consumer.close(), 20)
        if kafka_down:
            # Later tests use this Kafka.
            await stack.start_component(settings, "kafka")
    # The unfinished batch was not committed: it is applied again on the next start. (Until the
    # restarted broker knows the topic again, it answers for the offset with an unknown
    # partition, which aiokafka reports as nothing committed.)
    committed = await eventually(
        lambda: _committed(settings, group, tp), lambda o: o is not None, within_s=60, what="the offset"
    )
    assert committed == 10
