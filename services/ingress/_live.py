"""One blocking XREAD for many StreamConversation calls.

A call used to hold a Redis connection of its own while it waited for its conversation's next
event, so N live streams were N Redis connections: past Redis's default `maxclients` (10,000)
well before 20k streams. The hub puts calls on readers instead. A reader is one connection
blocked in XREAD over the streams of up to `per_reader` calls, and it hands what arrives to each
call's queue. A call that joins (or a paused one that catches up) wakes its reader with
`CLIENT UNBLOCK`, so the reader re-reads at once with the new set of streams.

Per call, the hub keeps the last entry id delivered for each of its streams. A reader reads each
stream from the lowest position any of its calls has and gives every call only what lies past its
own position, so calls on one conversation at different cursors each get exactly their part. A
call whose consumer is slow (its queue past `PAUSE_AT` batches) is left out of the reads until it
has caught up: memory stays bounded and the others are not held back. A Redis error ends every
call of that reader with the error (the caller answers UNAVAILABLE and the client resumes from its
cursor), as a per-call read did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]
Batch = list[tuple[str, list[Entry]]]  # (stream key, its new entries), in XREAD's order
PAUSE_AT = 64  # batches queued for one call before the reader leaves it out
RESUME_AT = 8
_COUNT = 500  # entries per stream per read


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Subscription:
    """What one call follows: stream key -> last id it was given; read with `next()`."""

    def __init__(self, positions: dict[str, str]) -> None:
        self.positions = dict(positions)
        self._queue: asyncio.Queue[Batch | BaseException] = asyncio.Queue()
        self.paused = False
        self._reader: _Reader | None = None

    async def next(self) -> Batch:
        """The next batch of entries (waits for one); raises what ended the reader's read."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if self.paused and self._queue.qsize() <= RESUME_AT and self._reader is not None:
            self.paused = False
            self._reader.wake()
        return item

    def close(self) -> None:
        if self._reader is not None:
            self._reader.remove(self)
            self._reader = None

    def _deliver(self, batch: Batch) -> None:
        self._queue.put_nowait(batch)
        if self._queue.qsize() >= PAUSE_AT:
            self.paused = True

    def _fail(self, exc: BaseException) -> None:
        self._reader = None
        self._queue.put_nowait(exc)

    def _end(self, exc: BaseException) -> None:
        """Like _fail, dropping what is queued: the caller resumes from the last cursor it got."""
        while not self._queue.empty():
            self._queue.get_nowait()
        self._fail(exc)


class _Reader:
    """One connection, one XREAD at a time over the streams of its calls."""

    def __init__(self, hub: LiveHub) -> None:
        self._hub = hub
        self._redis = aioredis.Redis.from_url(
            hub.redis_url, single_connection_client=True, socket_timeout=hub.socket_timeout_s
        )
        self.subs: set[Subscription] = set()
        self._by_key: dict[str, set[Subscription]] = {}
        self._client_id: int | None = None
        self._blocked = False
        self._generation = 0
        self._changed = asyncio.Event()
        self._closing = False
        # Whether the last read failed on a dropped connection and is being tried once more.
        self._retried = False
        # Wakes asked for, and how many of them the read in progress includes: a wake is done
        # once a read began after it (`_serving >= its token`).
        self._wanted = 0
        self._serving = 0
        self._wake_scheduled = False
        self._wakers: set[asyncio.Task[None]] = set()
        self._task = asyncio.ensure_future(self._run())

    def add(self, sub: Subscription) -> None:
        sub._reader = self
        self.subs.add(sub)
        for key in sub.positions:
            self._by_key.setdefault(key, set()).add(sub)
        self.wake()

    def remove(self, sub: Subscription) -> None:
        # No wake: the reader reads the call's streams at most once more, and drops what comes.
        self.subs.discard(sub)
        for key in sub.positions:
            subs = self._by_key.get(key)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_key[key]

    def wake(self) -> None:
        """Make the reader start a read with its current calls soon (wakes of one event-loop
        tick share one CLIENT UNBLOCK)."""
        self._wanted += 1
        self._changed.set()
        if not self._wake_scheduled:
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_wake)

    def _start_wake(self) -> None:
        self._wake_scheduled = False
        task = asyncio.ensure_future(self._unblock(self._wanted))
        self._wakers.add(task)
        task.add_done_callback(self._wakers.discard)

    async def _unblock(self, token: int) -> None:
        # Until a read began that includes this wake: CLIENT UNBLOCK goes over another connection,
        # so it can reach Redis before this reader's XREAD does (then it unblocks nothing), and
        # an unblock can land on a read that began before the wake; so check, and send again.
        for _ in range(200):
            if self._serving >= token or self._closing:
                return
            if self._blocked and self._client_id is not None:
                try:
                    await self._hub.control.client_unblock(self._client_id)
                except Exception as exc:
                    log.debug("live reader wake failed: %r", exc)
                    return
            await asyncio.sleep(0.005)

    def _streams(self) -> dict[str, str]:
        streams: dict[str, str] = {}
        for sub in self.subs:
            if sub.paused:
                continue
            for key, position in sub.positions.items():
                current = streams.get(key)
                if current is None or _id(position) < _id(current):
                    streams[key] = position
        return streams

    async def _run(self) -> None:
        # Ends on `_closing` too: redis-py can turn the cancellation of a blocked read into an
        # error of its own, and a cancel that was swallowed there would leave this loop running.
        while not self._closing:
            self._serving = self._wanted
            self._changed.clear()
            streams = self._streams()
            if not streams:
                await self._changed.wait()
                continue
            reading = [s for s in self.subs if not s.paused]
            try:
                if self._client_id is None:
                    self._client_id = int(await self._redis.client_id())
                self._blocked = True
                reply: Any = await self._redis.xread(
                    dict[Any, Any](streams), block=self._hub.block_ms, count=_COUNT
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    return
                # The connection is reopened by the next command, with another client id.
                self._client_id = None
                if isinstance(exc, RedisConnectionError) and not self._retried:
                    # Once at once, the calls kept (nothing was delivered: their positions stand):
                    # a reader idle while Redis restarted still held its dead connection, and the
                    # first calls to join it failed UNAVAILABLE with Redis up (crash rehearsal 4).
                    self._retried = True
                    continue
                self._retried = False  # the next calls to join get their own try once more
                for sub in reading:
                    if sub in self.subs:
                        self.remove(sub)
                        sub._fail(exc)
                continue
            finally:
                self._blocked = False
                self._generation += 1
            self._retried = False
            if reply:
                self._dispatch(reply, set(reading))

    def _dispatch(self, reply: Any, reading: set[Subscription]) -> None:
        """Entries to the calls that were in the read: a call that joined (or resumed) during it
        may be behind where it read from; it gets its entries from its next read."""
        batches: dict[Subscription, Batch] = {}
        for raw_key, entries in reply:
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            if not entries:
                continue
            for sub in self._by_key.get(key, ()):
                if sub.paused or sub not in reading:
                    continue
                after = _id(sub.positions[key])
                mine = [e for e in entries if _id(e[0].decode()) > after]
                if mine:
                    sub.positions[key] = mine[-1][0].decode()
                    batches.setdefault(sub, []).append((key, mine))
        for sub, batch in batches.items():
            sub._deliver(batch)

    async def close(self) -> None:
        self._closing = True
        self._changed.set()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for waker in list(self._wakers):
            waker.cancel()
        for sub in list(self.subs):
            self.remove(sub)
            sub._fail(ConnectionError("the ingress is stopping"))
        await self._redis.aclose()


class LiveHub:
    """Readers for a process's StreamConversation calls: `subscribe` puts a call on one."""

    def __init__(
        self,
        redis_url: str,
        control: aioredis.Redis,
        *,
        per_reader: int = 256,
        block_ms: int = 5_000,
        socket_timeout_s: float = 15.0,
    ) -> None:
        self.redis_url = redis_url
        # Where CLIENT UNBLOCK is sent from (any connection but the readers').
        self.control = control
        self.per_reader = per_reader
        self.block_ms = block_ms
        self.socket_timeout_s = socket_timeout_s
        self._readers: list[_Reader] = []
        self._ended: Callable[[], BaseException] | None = None

    def subscribe(self, positions: dict[str, str]) -> Subscription:
        """Follow these streams from these ids (exclusive); `close()` the result when done."""
        sub = Subscription(positions)
        if self._ended is not None:
            sub._fail(self._ended())
            return sub
        reader = min(self._readers, key=lambda r: len(r.subs), default=None)
        if reader is None or len(reader.subs) >= self.per_reader:
            reader = _Reader(self)
            self._readers.append(reader)
        reader.add(sub)
        return sub

    @property
    def connections(self) -> int:
        return len(self._readers)

    def end_follows(self, why: Callable[[], BaseException]) -> None:
        """Every call's follow ends with `why()` at its next read, what it had queued dropped, and
        so does any begun later (the process is draining: its callers resume from their last cursor
        on another process). A new exception each: one raised by every call would collect all
        their frames in its traceback. The readers stay until `close()`."""
        self._ended = why
        for reader in self._readers:
            for sub in list(reader.subs):
                reader.remove(sub)
                sub._end(why())

    async def close(self) -> None:
        readers, self._readers = self._readers, []
        for reader in readers:
            await reader.close()
