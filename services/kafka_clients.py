"""What Switchboard's Kafka clients share: starting one without leaving it half open, and the
errors after which an idempotent producer is broken for good."""

from __future__ import annotations

import contextlib
from typing import Protocol, TypeVar

from aiokafka.errors import (
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)

# Errors after which an idempotent producer's sequence state is broken for good (a broker
# restart can leave it so): every later send fails; only a new producer, with a new producer id,
# writes again.
FATAL_PRODUCER_ERRORS = (
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    ProducerFenced,
)


class _Client(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


C = TypeVar("C", bound=_Client)


async def started(client: C) -> C:
    """`client`, started; stopped again when its start fails or is cancelled (a half-started
    client keeps its connections and background tasks)."""
    try:
        await client.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await client.stop()
        raise
    return client
