"""A producer replaced while Kafka does not answer: sends are refused within the produce timeout,
one start is tried for all of them, and the writes go on once Kafka answers.

After a fatal delivery error (its sequence state broken, seen after a broker restart) the ingress
replaces its producer; the next sends start a new one. Each used to start its own, one after
another, each waiting for its bootstrap's request timeout (produce_timeout_s + 20 s) while the
broker was stopped. The rates with a killed broker are in tests/unit/test_ingress_producer_start.py.
Kafka not answering is the broker stopped with SIGSTOP, as in test_erasure_follower_bound.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import psutil
import pytest
from aiokafka.errors import OutOfOrderSequenceNumber
from switchboard.v1 import events_pb2

from schemas.events import new_event
from services import stack
from services.ingress._producer import Ack, EventProducer, Unavailable
from services.settings import Settings
from tests.integration.conftest import eventually

pytestmark = pytest.mark.integration

SENDS = 50


def message(i: int) -> events_pb2.Event:
    return new_event("producer-restart", f"c{i}", message_received=events_pb2.MessageReceived(text="hi"))


@pytest.mark.timeout(180)
async def test_a_replaced_producer_with_kafka_stopped_refuses_in_time_and_recovers(
    local_stack: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = local_stack.model_copy(update={"produce_timeout_s": 2.0})
    producer = EventProducer(settings)
    await producer.start()
    broker = psutil.Process((await stack.status(local_stack))["kafka"]["pid"])
    caplog.set_level(logging.DEBUG, logger="aiokafka")
    broker.send_signal(signal.SIGSTOP)
    try:
        producer._replace_producer(OutOfOrderSequenceNumber())  # as wait_acks does on that error
        sends = asyncio.ensure_future(
            asyncio.gather(*(producer.enqueue(message(i)) for i in range(SENDS)), return_exceptions=True)
        )
        done, _ = await asyncio.wait({sends}, timeout=15)
        assert done, "sends still wait for the new producer's start, far past the produce timeout"
        outcomes = sends.result()
        assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
        starts = [r for r in caplog.records if r.getMessage().startswith("Attempting to bootstrap")]
        assert len(starts) == 1, f"{len(starts)} producer starts for {SENDS} sends"
    finally:
        broker.send_signal(signal.SIGCONT)

    async def send() -> Ack | Unavailable:
        event = message(0)
        try:
            delivery = await producer.enqueue(event)
        except Unavailable as exc:
            return exc
        (ack,) = await producer.wait_acks([event], [delivery], [None])
        return ack

    try:
        ack = await eventually(
            send, lambda a: isinstance(a, Ack), within_s=60, what="an ack once Kafka answers"
        )
        assert isinstance(ack, Ack) and ack.offset >= 0
    finally:
        await producer.stop()
