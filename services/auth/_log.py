"""The `tenants` topic: appending records, reading it whole, and following it live.

Every ingress folds the compacted topic into its own in-process registry (read to the end before
it serves, then followed with a short fetch wait), so an issued or revoked key reaches every
replica within a fraction of a second, with no restart and no Redis round trip per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

import services.kafka_clients  # noqa: F401  (throttles aiokafka's failed metadata updates)
from services.auth._model import Record, Registry, encode_record
from services.kafka_clients import started
from services.settings import Settings
from streams._consumer import fetch_task_ended, raise_if_cancelling

log = logging.getLogger(__name__)

# How long the follower's fetch waits at the broker when there is nothing new. Not a bound on a
# revocation's delay: the topic has one partition, always in the fetch under way, and the broker
# answers that fetch as soon as a record arrives (fetch.min.bytes 1). It sets how often an idle
# follower asks: every process has one, and at 100 ms their fetches cost an idle Kafka more CPU
# than anything else it did (benchmarks/RESULTS.md, nineteenth session).
FOLLOW_FETCH_WAIT_MS = 500
# How long a broken consumer may take to stop before a new one replaces it.
STOP_BOUND_S = 10.0
# A read to the topic's end that takes longer is begun again, with a new consumer, from where it
# got to: one whose fetch task ended (aio-libs/aiokafka#983) never gets there, and position() of a
# partition being reset never returns.
CATCH_UP_BOUND_S = 30.0


class TenantsTopicMissing(RuntimeError):
    pass


class FetchEnded(RuntimeError):
    """The follower's Kafka consumer stopped fetching (see `fetch_task_ended`)."""


def load_pepper(settings: Settings) -> bytes:
    """The server-side pepper of key hashes: SWITCHBOARD_AUTH_PEPPER, else a random one kept in
    `<data_dir>/secrets/auth-pepper` (mode 0600), made on first use."""
    if settings.auth_pepper:
        return settings.auth_pepper.encode()
    path = Path(settings.data_dir) / "secrets" / "auth-pepper"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "w") as out:
        out.write(os.urandom(32).hex())
    return path.read_bytes().strip()


async def append_records(settings: Settings, records: Sequence[Record]) -> None:
    """Write records durably (acks=all); returns once Kafka has all of them."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        client_id="switchboard-tenants-admin",
    )
    await producer.start()
    try:
        for record in records:
            key, value = encode_record(record)
            await producer.send_and_wait(settings.tenants_topic, value, key=key)
    finally:
        await producer.stop()


class RegistryFollower:
    """Keeps a `Registry` folded from the tenants topic; `on_change` runs after each applied batch."""

    def __init__(self, settings: Settings, on_change: Callable[[Registry], None] | None = None) -> None:
        self.settings = settings
        self.registry = Registry()
        self._on_change = on_change
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        # Per partition: the offset after the last record read (where a new consumer goes on).
        self._next: dict[TopicPartition, int] = {}

    async def catch_up(self) -> Registry:
        """Read the topic from the beginning to its current end."""
        while True:
            try:
                consumer, ends = await self._open()
            except FetchEnded as exc:
                log.warning("tenants topic: %s", exc)
                continue
            try:
                await asyncio.wait_for(self._read_to_end(consumer, ends), CATCH_UP_BOUND_S)
            except (TimeoutError, FetchEnded) as exc:
                await _stop_bounded(consumer)
                log.warning(
                    "tenants topic: the read to its end stalled (%r); reading on with a new consumer", exc
                )
                continue
            except BaseException:
                await consumer.stop()
                raise
            self._consumer = consumer
            return self.registry

    async def _read_to_end(self, consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> None:
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            ended = fetch_task_ended(consumer)
            if ended is not None:
                raise FetchEnded(f"the consumer's fetch task has ended ({ended!r})")
            self._apply(await consumer.getmany(timeout_ms=500))

    async def _open(self) -> tuple[AIOKafkaConsumer, dict[TopicPartition, int]]:
        """A consumer of the topic's partitions, each where this follower has read up to (from
        the beginning for one it has not read yet), and their end offsets as it was opened (asked
        before the first fetch: a fetch parked at the broker on an empty topic would hold up the
        request behind it on the connection for FOLLOW_FETCH_WAIT_MS). FetchEnded when the seek
        stalls: a consumer whose fetch task ended (aio-libs/aiokafka#983) waits its whole request
        timeout (40 s) in seek_to_beginning, which that task serves."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=FOLLOW_FETCH_WAIT_MS,
            client_id="switchboard-tenants-follower",
        )
        await started(consumer)
        try:
            partitions = await topic_partitions(consumer, self.settings.tenants_topic)
            ends = await asyncio.wait_for(consumer.end_offsets(partitions), CATCH_UP_BOUND_S)
            consumer.assign(partitions)
            try:
                await asyncio.wait_for(consumer.seek_to_beginning(*partitions), CATCH_UP_BOUND_S)
            except TimeoutError as exc:
                raise FetchEnded("a new consumer's seek stalled; opening another") from exc
            for tp in partitions:
                if tp in self._next:
                    consumer.seek(tp, self._next[tp])
        except BaseException:
            await _stop_bounded(consumer)
            raise
        return consumer, {tp: int(end) for tp, end in ends.items()}

    async def start(self) -> Registry:
        registry = await self.catch_up()
        self._task = asyncio.ensure_future(self._follow())
        return registry

    async def _follow(self) -> None:
        while True:
            try:
                if self._consumer is None:
                    self._consumer, _ = await self._open()
                ended = fetch_task_ended(self._consumer)
                if ended is not None:
                    # aio-libs/aiokafka#983: getmany would return nothing, forever, and raise
                    # nothing (a revoked key would go on working here): read on with a new one.
                    raise FetchEnded(f"the consumer's fetch task has ended ({ended!r})")
                self._apply(await self._consumer.getmany(timeout_ms=1000))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the client reconnects by itself; keep the last registry
                raise_if_cancelling(exc)
                if isinstance(exc, FetchEnded) and self._consumer is not None:
                    consumer, self._consumer = self._consumer, None
                    await _stop_bounded(consumer)
                log.warning("tenants topic: fetch failed (%r); keys as of the last record stay in force", exc)
                await asyncio.sleep(0.5)

    def _apply(self, batches: dict[TopicPartition, list[object]]) -> None:
        applied = 0
        for tp, records in batches.items():
            for msg in records:
                self._next[tp] = msg.offset + 1  # type: ignore[attr-defined]
                try:
                    self.registry.apply(msg.key, msg.value)  # type: ignore[attr-defined]
                    applied += 1
                except Exception as exc:  # one bad record must not stop the fold of the others
                    log.error(
                        "tenants topic: skipped offset %s: %s",
                        getattr(msg, "offset", "?"),
                        exc,
                    )
        if applied and self._on_change is not None:
            self._on_change(self.registry)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


async def _stop_bounded(consumer: AIOKafkaConsumer) -> None:
    """Stop a consumer that may be wedged (its fetch task ended, a broker not answering)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(consumer.stop(), STOP_BOUND_S)


async def topic_partitions(
    consumer: AIOKafkaConsumer, topic: str, within_s: float = 30.0
) -> list[TopicPartition]:
    """The topic's partitions, once the cluster knows their leaders (a topic just created has none
    for a moment)."""
    deadline = time.monotonic() + within_s
    # No metadata at all (a broker starting, or restarted a moment ago: seen in CI) is asked
    # again for a few seconds only: a Kafka that is down is said at once, more or less.
    unanswered_until = time.monotonic() + min(within_s, 5.0)
    while True:
        # A fresh metadata fetch: the consumer's own cache only covers topics it subscribed to.
        # (A topic created a moment ago may not be in the broker's metadata yet: keep asking.)
        try:
            cluster = await consumer._client.fetch_all_metadata()
        except KafkaError:
            if time.monotonic() > unanswered_until:
                raise
            await asyncio.sleep(0.2)
            continue
        numbers = cluster.partitions_for_topic(topic) if topic in cluster.topics() else None
        if numbers:
            return [TopicPartition(topic, p) for p in sorted(numbers)]
        if time.monotonic() > deadline:
            if topic not in cluster.topics():
                raise TenantsTopicMissing(f"topic {topic!r} does not exist: run `switchboard topics create`")
            raise TimeoutError(f"topic {topic!r} has no partition with a leader after {within_s:.0f} s")
        await asyncio.sleep(0.2)


async def read_registry(settings: Settings) -> Registry:
    """The registry as of now (for the CLI and the start-up check)."""
    follower = RegistryFollower(settings)
    try:
        return await follower.catch_up()
    finally:
        await follower.stop()
