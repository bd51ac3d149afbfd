"""While the ingress has no started Kafka producer and Kafka is away, sends share one start.

Found by review (measured, see the commit): after a fatal producer error the ingress replaces its
producer (EventProducer._replace_producer) and the next send starts a new one. With Kafka away,
every send started, bootstrapped and stopped a producer of its own, one after another: with the
broker killed, 14,480 bootstraps (a connection and a metadata request each, logged) in 6 s for
50 writers; with the broker stopped (SIGSTOP), each send waited for its own bootstrap's request
timeout (produce_timeout_s + 20 s) in turn, far past the produce timeout.

Kafka away here is a port on 127.0.0.1 that refuses connections, or one that accepts them and
never answers (what a SIGSTOPped broker looks like), no mock; the attempts are counted as the
connections the listener accepted or as aiokafka's own log records.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import grpc
import pytest
from switchboard.v1 import events_pb2

from schemas.events import Event, new_event
from services.ingress._producer import EventProducer, Unavailable
from services.settings import Settings

CALLERS = 50


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def event(i: int) -> Event:
    return new_event("acme", f"c{i}", message_received=events_pb2.MessageReceived(text="hi"))


async def refusals(producer: EventProducer, bounded: bool) -> list[BaseException | object]:
    return await asyncio.gather(
        *(producer.enqueue(event(i), bounded=bounded) for i in range(CALLERS)), return_exceptions=True
    )


@pytest.fixture
async def unanswering() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A port that accepts connections and never answers (a broker stopped with SIGSTOP)."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        for writer in accepted:
            writer.close()
        server.close()


async def test_sends_while_kafka_refuses_connections_try_one_start_not_one_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    producer = EventProducer(Settings(kafka_bootstrap=f"127.0.0.1:{closed_port()}", produce_timeout_s=2))
    caplog.set_level(logging.ERROR, logger="aiokafka")
    outcomes = await refusals(producer, bounded=False)
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert all(o.code == grpc.StatusCode.UNAVAILABLE for o in outcomes if isinstance(o, Unavailable))
    assert all("not reachable" in str(o) for o in outcomes), outcomes[0]
    tries = [r for r in caplog.records if r.getMessage().startswith("Unable connect to")]
    assert len(tries) == 1, f"{len(tries)} bootstraps for {CALLERS} sends"
    # Within the retry interval later sends are refused at once, without another attempt.
    assert all(isinstance(o, Unavailable) for o in await refusals(producer, bounded=True))
    assert len([r for r in caplog.records if r.getMessage().startswith("Unable connect to")]) == 1
    await producer.stop()


@pytest.mark.timeout(120)
async def test_sends_while_kafka_does_not_answer_share_one_start_bounded_by_the_produce_timeout(
    unanswering: tuple[int, list[asyncio.StreamWriter]],
) -> None:
    port, accepted = unanswering
    producer = EventProducer(Settings(kafka_bootstrap=f"127.0.0.1:{port}", produce_timeout_s=1))
    attempt = asyncio.ensure_future(refusals(producer, bounded=True))
    # The bootstrap's own timeout is produce_timeout_s + 20 s: the sends must not wait for it.
    done, _ = await asyncio.wait({attempt}, timeout=10)
    assert done, "the sends still wait for a producer that does not start, past the produce timeout"
    outcomes = attempt.result()
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert len(accepted) == 1, f"{len(accepted)} connections (bootstraps) for {CALLERS} sends"
    await producer.stop()
