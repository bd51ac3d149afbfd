"""What Switchboard's Kafka clients share: starting one without leaving it half open, the
errors after which an idempotent producer is broken for good, and a back-off between failed
metadata updates (applied to aiokafka when this module is imported: every module of ours that
imports aiokafka imports this one, see tests/unit/test_kafka_metadata_backoff.py)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from typing import Any, Protocol, TypeVar

import aiokafka
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import (
    InvalidProducerEpoch,
    InvalidProducerIdMapping,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)

from services.outages import closed_transport

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


log = logging.getLogger(__name__)


def sender_task(producer: Any) -> asyncio.Future[None] | None:
    """A started AIOKafkaProducer's sender task (aiokafka's private `_sender.sender_task`, read
    in 0.14), or None (logged) when this aiokafka has none there. The task ends, other than by a
    close, only on an error aiokafka did not expect; it then fails every batch it held (some may
    have been written) and every later send fails at once."""
    task = getattr(getattr(producer, "_sender", None), "sender_task", None)
    if isinstance(task, asyncio.Future):
        return task
    log.warning(
        "aiokafka %s: no sender task found; a producer whose sender ended is not noticed",
        aiokafka.__version__,
    )
    return None


def sender_ended(producer: Any) -> bool:
    """Whether `producer`'s sender task has ended (then every send fails, for good: only a new
    producer writes again); False when it is not known."""
    task = sender_task(producer) if producer is not None else None
    return task is not None and task.done()


def _written_for(original: Any, versions: tuple[str, ...], params: list[str], otherwise: str) -> bool:
    """Whether a patch of `original` was written for this aiokafka (its version and `original`'s
    parameters); logs what is not done when not."""
    if aiokafka.__version__.startswith(versions) and list(inspect.signature(original).parameters) == params:
        return True
    log.warning("aiokafka %s: %s (patch written for %s)", aiokafka.__version__, otherwise, versions)
    return False


# The aiokafka versions whose AIOKafkaClient._metadata_update we have read and patch.
_BACKOFF_VERSIONS = ("0.14.",)


def _throttle_failed_metadata_updates() -> bool:
    """Make a failed metadata update wait retry_backoff_ms before it reports its failure.

    Why: in aiokafka 0.14 a metadata update against a broker that refuses connections fails at
    once and returns False with no back-off, and the consumer's fetcher (while its metadata says
    a partition has no leader) and the producer's sender (a batch for such a partition) ask for
    the next one at once. A broker in controlled shutdown hands out exactly that metadata (leader
    -1) just before it closes its port, so while it was down a client spun: 4,000-8,000 failed
    updates a second in the ingress, assistant and archiver in test_durability's broker restart,
    a whole core per client in benchmarks/kafka_outage.py, on the cores the broker needs to
    restart. No setting changes it (retry_backoff_ms is not applied on that path); upstream
    has the same missing back-off in the fetcher after NotLeader answers open as
    aio-libs/aiokafka#1155. The wait sits inside the update, so the metadata task and every
    caller awaiting `force_metadata_update()` are held by it; a successful update returns at
    once, and `bootstrap()` does not go through this method (`fetch_all_metadata()`, behind
    `consumer.topics()`, does: its failure is raised retry_backoff_ms later). Returns whether
    the patch is in place.
    """
    original = AIOKafkaClient._metadata_update
    if getattr(original, "_switchboard_backoff", False):
        return True
    # Another aiokafka: read its client.py before extending _BACKOFF_VERSIONS
    # (tests/unit/test_kafka_metadata_backoff.py fails if the spin is still there).
    if not _written_for(
        original,
        _BACKOFF_VERSIONS,
        ["self", "cluster_metadata", "topics"],
        "failed metadata updates are not throttled",
    ) or not inspect.iscoroutinefunction(original):
        return False

    async def _metadata_update(self: AIOKafkaClient, cluster_metadata: Any, topics: Any) -> bool:
        try:
            updated: bool = await original(self, cluster_metadata, topics)
        except Exception as exc:
            # aiokafka's metadata task ends on anything but a KafkaError or a timeout here, for
            # good: every later force_metadata_update() then waits forever, and a consumer's group
            # coordination with it, holding the lock its commits need (see
            # _closed_transport_writes_fail_as_connection_errors for the one seen). A failed
            # update instead, tried again.
            log.warning("aiokafka's metadata update failed: %r", exc)
            updated = False
        if not updated:
            await asyncio.sleep(self._retry_backoff)
        return updated

    _metadata_update._switchboard_backoff = True  # type: ignore[attr-defined]
    AIOKafkaClient._metadata_update = _metadata_update
    return True


METADATA_BACKOFF = _throttle_failed_metadata_updates()


# The aiokafka versions whose AIOKafkaConnection.send we have read and patch.
_CLOSED_WRITE_VERSIONS = ("0.14.",)


def _closed_transport_writes_fail_as_connection_errors() -> bool:
    """Make a request written to a connection whose transport is already closed fail with
    KafkaConnectionError (the connection closed), as a write's OSError does.

    Why: uvloop refuses a write on a transport it has closed (after the peer's reset or close,
    once it has told the protocol) with a RuntimeError ("unable to perform operation on
    <TCPTransport closed=True ...>; the handler is closed"), and aiokafka 0.14's
    `AIOKafkaConnection.send` turns only OSError into a connection error. A broker's kill -9 opens
    that window (uvloop has handled the reset, aiokafka's reader has not closed the connection
    yet, so `_get_conn` still hands it out): a metadata request written into it raised the
    RuntimeError out of the client's metadata task, which then ended for good. From then on
    `force_metadata_update()` never completed; the group coordination waited on it while holding
    the coordinator lookup lock, and every commit of that consumer waited behind it until
    COMMIT_BOUND_S started the consumer again (the sessions fold stood 34 s in a soak;
    benchmarks/commit_wedge.py). The same error ended a producer's sender and a consumer's
    fetcher routine. Any other RuntimeError is passed on as it is. Returns whether the patch is
    in place.
    """
    from aiokafka.conn import AIOKafkaConnection, CloseReason
    from aiokafka.errors import KafkaConnectionError

    original = AIOKafkaConnection.send
    if getattr(original, "_switchboard_closed_write", False):
        return True
    # Another aiokafka: read its conn.py before extending _CLOSED_WRITE_VERSIONS
    # (tests/unit/test_kafka_closed_transport.py fails if the write still raises RuntimeError).
    if not _written_for(
        original,
        _CLOSED_WRITE_VERSIONS,
        ["self", "request", "expect_response"],
        "writes on a closed transport are not turned into connection errors",
    ):
        return False

    def send(self: AIOKafkaConnection, request: Any, expect_response: bool = True) -> Any:
        try:
            return original(self, request, expect_response)
        except RuntimeError as exc:
            if not closed_transport(exc):
                raise
            self.close(reason=CloseReason.CONNECTION_BROKEN, exc=exc)
            raise KafkaConnectionError(f"Connection at {self._host}:{self._port} broken: {exc}") from exc

    send._switchboard_closed_write = True  # type: ignore[attr-defined]
    AIOKafkaConnection.send = send
    return True


CLOSED_WRITE_PATCHED = _closed_transport_writes_fail_as_connection_errors()
