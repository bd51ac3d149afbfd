"""The ingress's side of the Redis hot view: conversation registry, idempotency keys, reads."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas import hotview as hv
from services.ingress._producer import Ack, Unavailable, unavailable
from services.outages import closed_transport

log = logging.getLogger(__name__)

# Readiness and claims in one step: while the hot view is incomplete (HLEN of READY_KEY below the
# partition count, as after Redis lost data) nothing is claimed, so no write can miss the claim
# of an earlier attempt that a rebuild has not restored yet. SET NX GET returns what was there.
# KEYS: the readiness hash, the ingress processes' leases (hv.INGRESS_LEASES_KEY), then the claim
# keys (starts and closes). A claim pending in an attempt of a dead process is answered
# "orphaned:<its value>", or with ARGV[5] = "1" taken over, as _CLAIM_OPEN_IF_READY says below.
# With ARGV[6] = "1" (closes) a process is dead only once its lease was ended (negative: it
# stopped, or its supervisor saw it exit), not when it only ran out: a stalled process's close
# may still land, and a close taken over from it that then failed would let sends be acked
# before that late close.
_CLAIM_IF_READY = """
local need = tonumber(ARGV[1])
if need > 0 and redis.call('HLEN', KEYS[1]) < need then
  return -1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix_len = tonumber(ARGV[4])
local take_over = ARGV[5] == '1'
local dead_before = now
if ARGV[6] == '1' then
  dead_before = 0
end
local previous = {}
for i = 3, #KEYS do
  local earlier = redis.call('SET', KEYS[i], ARGV[2], 'NX', 'GET', 'EX', ARGV[3])
  if earlier == ARGV[2] then
    earlier = false  -- this very attempt, run again (a retried pipeline): it is ours
  elseif earlier and string.sub(earlier, 1, 8) == 'pending:' then
    local lease = redis.call('HGET', KEYS[2], string.sub(earlier, 1, prefix_len))
    if lease and tonumber(lease) < dead_before then
      if take_over then
        redis.call('SET', KEYS[i], ARGV[2], 'EX', ARGV[3])
        earlier = false
      else
        earlier = 'orphaned:' .. earlier
      end
    end
  end
  previous[i - 2] = earlier
end
return previous
"""

# The same for customer (and agent) messages, with the conversation's close in the same step.
# KEYS are the readiness hash, then (conversation hash, claim key, in-flight set) triples. A
# conversation whose hash has `closed_ns` (written once the close is durable, by the ingress and
# by the sessions worker) or a `closing` hold that has not expired (a close under way, in any
# ingress process) claims nothing: the key's earlier value is answered if it has one (a retry of
# a written message still gets its ack), else 0 (closed) or 1 (being closed; 2: by a close of a
# process whose lease was ended, see below). A claimed key joins
# the conversation's in-flight set until its outcome is settled; a close waits for that set to
# empty before it publishes, so no message acknowledged to anyone lands after the close in the
# log. This is what lets the ingress keep the conversation registry in process memory:
# existence never changes, and the close, which does, is read here.
#
# KEYS[2] is the ingress processes' leases (hv.INGRESS_LEASES_KEY; ARGV[6]: a marker's prefix
# length). A pending claim whose process's lease ran out or was ended (it died mid-write) is
# answered "orphaned:<its value>"; with ARGV[7] = "1" it is taken over by this attempt instead.
# The caller asks for that only once the sessions worker has folded the log past everything the
# dead process can have written (see ConversationWrites._take_over): had its record landed, the
# fold would have recorded its ack in the claim (duplicate=true) by then. A close hold is never
# dropped here: the close of a process whose lease was ended (it is dead) is finished by the
# ingress instead (ConversationWrites._finish_dead_close), so even a copy of it still on its way
# (in the dead process's socket, or appended but not yet committed) lands as a second close, which
# the fold ignores. A hold whose process's lease only ran out is waited out (answered 1): that
# process may be stalled with its close still to come. A message pending in a dead process's
# attempt of a conversation closed or held meanwhile is answered "orphaned:<its value>" too, and
# once the fold is past the log's end (take_over) like a new one (0, 1 or 2).
_CLAIM_OPEN_IF_READY = """
local need = tonumber(ARGV[1])
if need > 0 and redis.call('HLEN', KEYS[1]) < need then
  return -1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl_ms = tonumber(ARGV[3]) * 1000
local prefix_len = tonumber(ARGV[6])
local function orphaned(value)
  if string.sub(value, 1, 8) ~= 'pending:' then
    return false
  end
  local lease = redis.call('HGET', KEYS[2], string.sub(value, 1, prefix_len))
  return lease and tonumber(lease) < now
end
local take_over = ARGV[7] == '1'
local function closing_now(hash)
  local holding = redis.call('HGET', hash, ARGV[5])
  if not holding or tonumber(string.match(holding, '^%d+') or '0') <= now then
    return -1
  end
  local owner = string.match(holding, '^%d+:(.*)$') or ''
  local lease = redis.call('HGET', KEYS[2], string.sub(owner, 1, prefix_len))
  if lease and tonumber(lease) < 0 then
    return 2  -- its process stopped, or its supervisor saw it exit (see _CLAIM_IF_READY)
  end
  return 1
end
local previous = {}
local shut_of = {}  -- a batch's messages of one conversation read its hash once
local expiring = {}  -- and set its in-flight set's expiry once
for i = 3, #KEYS, 3 do
  local shut = shut_of[KEYS[i]]
  if shut == nil then
    shut = -1
    if redis.call('HEXISTS', KEYS[i], ARGV[4]) == 1 then
      shut = 0
    else
      shut = closing_now(KEYS[i])
    end
    shut_of[KEYS[i]] = shut
  end
  if shut >= 0 then
    local earlier = redis.call('GET', KEYS[i + 1])
    if earlier == ARGV[2] then
      -- This attempt claimed it before the hold and runs again (a retried pipeline): let go.
      redis.call('DEL', KEYS[i + 1])
      redis.call('ZREM', KEYS[i + 2], ARGV[2] .. KEYS[i + 1])
      earlier = false
    end
    if earlier and orphaned(earlier) then
      if take_over then
        -- Pending in a dead process's attempt, and the fold is past where the log ended (see
        -- below): never written, so the conversation's state is the answer.
        previous[#previous + 1] = shut
      else
        -- Its record may be in the log with its ack not yet recorded: the caller waits for
        -- the fold first (then asks again with take_over).
        previous[#previous + 1] = 'orphaned:' .. earlier
      end
    elseif earlier then
      previous[#previous + 1] = earlier
    else
      previous[#previous + 1] = shut
    end
  else
    local earlier = redis.call('SET', KEYS[i + 1], ARGV[2], 'NX', 'GET', 'EX', ARGV[3])
    if earlier == ARGV[2] then
      earlier = false  -- this very attempt, run again (a retried pipeline): it is ours
    elseif earlier and orphaned(earlier) then
      if take_over then
        -- Its member stays in the in-flight set (until it expires, or the lease was ended for
        -- good) for a close to wait for: a process that only stalled could write it.
        redis.call('SET', KEYS[i + 1], ARGV[2], 'EX', ARGV[3])
        earlier = false
      else
        earlier = 'orphaned:' .. earlier
      end
    end
    if not earlier then
      redis.call('ZADD', KEYS[i + 2], now + ttl_ms, ARGV[2] .. KEYS[i + 1])
      if not expiring[KEYS[i + 2]] then
        redis.call('PEXPIRE', KEYS[i + 2], ttl_ms)
        expiring[KEYS[i + 2]] = true
      end
    end
    previous[#previous + 1] = earlier
  end
end
return previous
"""

# A close holds its conversation (KEYS: hash, in-flight set, the ingress leases; ARGV: hold
# field, hold ms, the closing process's marker prefix, the close attempt's own marker, kept in the
# hold as "<until ms>:<marker>" so that only it releases the hold; a marker prefix's length):
# sends are refused from now on, in every process, and the answer is how many messages claimed by
# other processes are still unsettled (expired members, and those of a process whose lease was
# ended (negative: it stopped, or its supervisor saw it die), are dropped first; a lease that only
# ran out is waited for: that process may be stalled, not dead). The closing process's own
# messages need no wait: its gate refuses those not yet handed to its producer, and those handed
# over are before the close in the log (one producer keeps a partition's order).
_HOLD_FOR_CLOSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], (now + tonumber(ARGV[2])) .. ':' .. ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local mine = ARGV[3]
local prefix_len = tonumber(ARGV[5])
local others = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if string.sub(member, 1, #mine) ~= mine then
    local lease = redis.call('HGET', KEYS[3], string.sub(member, 1, prefix_len))
    if lease and tonumber(lease) < 0 then
      redis.call('ZREM', KEYS[2], member)
    else
      others = others + 1
    end
  end
end
return others
"""

# A place among the tenant's open conversations (KEYS: the open set; ARGV: quota, conversation,
# reservation ms). Expired reservations (positive scores in the past: a start never folded) go
# first; a conversation already there keeps its place. Returns {1, count} or {0, count}.
# Drop a close's hold only if it is this attempt's (KEYS: hash; ARGV: hold field, marker).
_RELEASE_IF_MINE = """
local holding = redis.call('HGET', KEYS[1], ARGV[1])
if holding and string.sub(holding, -(#ARGV[2] + 1)) == ':' .. ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

_RESERVE_OPEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], 1, now)
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  return {1, redis.call('ZCARD', KEYS[1])}
end
local count = redis.call('ZCARD', KEYS[1])
if count >= tonumber(ARGV[1]) then
  return {0, count}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
return {1, count + 1}
"""

# Renew this process's lease (KEYS: the leases hash; ARGV: marker prefix, lease ms, forget ms).
# Lease ms 0 ends it for good: stored as minus the time it ended, which says "this process writes
# nothing any more" (it stopped after its producer, or its supervisor saw it die), so a close
# need not wait for its unsettled messages either; an ended lease is never renewed again (a late
# renewal, sent before the end on another connection). Leases that ended or ran out longer ago
# than any claim of theirs lives go.
_RENEW_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = tonumber(ARGV[2])
local current = redis.call('HGET', KEYS[1], ARGV[1])
if ms == 0 then
  redis.call('HSET', KEYS[1], ARGV[1], -now)
elseif current and tonumber(current) < 0 then
  return 0
else
  redis.call('HSET', KEYS[1], ARGV[1], now + ms)
end
local all = redis.call('HGETALL', KEYS[1])
local forget = now - tonumber(ARGV[3])
for i = 1, #all, 2 do
  if math.abs(tonumber(all[i + 1])) < forget then
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return 1
"""

# A touch of a claim whose write is still waiting for Kafka (KEYS: the claim, its conversation's
# in-flight set, the conversation hash; ARGV: the attempt's marker, the TTL in ms, its in-flight
# member or "" when it has none, "1" if a close, the closing field). A claim that holds an ack (recorded by the
# settlement) is left alone: a touch Redis runs after the settlement (sent on another connection
# before the acks came) must not cut the ack's expiry, put the message back in the in-flight set
# or hold a settled close's conversation again. A claim held by another attempt's marker (taken
# over: this process seemed dead) still has this attempt's in-flight entry extended, since this
# attempt's record may still land, but not the claim or a close hold. A claim Redis no longer has
# (lost with its data, or dropped by a failed write's settlement) has its in-flight entry and its
# close hold put back, as before: after a loss of Redis data closes wait for the message again (a
# late touch after a failed write's settlement then holds closes up to the TTL: not told apart).
_TOUCH_IF_PENDING = """
local holding = redis.call('GET', KEYS[1])
local mine = holding == ARGV[1]
if holding and not mine and string.sub(holding, 1, 8) ~= 'pending:' then
  return 0
end
local ms = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if mine then
  redis.call('PEXPIRE', KEYS[1], ms)
end
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[2], now + ms, ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ms)
end
if ARGV[4] == '1' and (mine or not holding) then
  redis.call('HSET', KEYS[3], ARGV[5], (now + ms) .. ':' .. ARGV[1])
end
return 1
"""


# Settle a batch of claims in one call (a command per message cost more in redis-py than the
# work itself). KEYS: the n claim keys, then each claim's in-flight set. ARGV: the ack TTL, n, then
# per claim its ack value (empty: the write failed), its attempt's marker, and "1" if it is in its
# in-flight set. An ack is recorded whatever the key holds (the record is in the log: that is the
# answer for the id), unless an ack at a lower offset is there already; a failed attempt's claim is dropped only while it holds that attempt's own
# marker (a late drop must not remove a later attempt's claim or recorded ack).
_SETTLE = """
local ttl = ARGV[1]
local n = tonumber(ARGV[2])
for i = 1, n do
  local value, marker = ARGV[3 * i], ARGV[3 * i + 1]
  if value ~= '' then
    -- An ack already recorded at a lower offset of the partition stays: of two writes of one id
    -- (a takeover, and a dead-seeming owner that was only stalled) the fold keeps the first.
    local current = redis.call('GET', KEYS[i])
    local kept = false
    if current and string.sub(current, 1, 8) ~= 'pending:' then
      -- event_id|partition|offset, then the text's digest when it has one (hv.encode_claim).
      local cp, co = string.match(current, '^[^|]*|(%d+)|(%d+)')
      local np, no = string.match(value, '^[^|]*|(%d+)|(%d+)')
      kept = cp ~= nil and cp == np and tonumber(co) < tonumber(no)
    end
    if kept then
      redis.call('EXPIRE', KEYS[i], ttl)
    else
      redis.call('SET', KEYS[i], value, 'EX', ttl)
    end
  elseif redis.call('GET', KEYS[i]) == marker then
    redis.call('DEL', KEYS[i])
  end
  if ARGV[3 * i + 2] == '1' then
    redis.call('ZREM', KEYS[n + i], marker .. KEYS[i])
  end
end
return n
"""


class _Commands:
    """What a `queue(pipe)` callback of TickPipeline.run writes to: `execute_command(*args)` only,
    each argument a str, bytes, int or float (packed by hiredis, as UTF-8)."""

    __slots__ = ("commands",)

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> None:
        self.commands.append(args)


class NothingSent(RedisConnectionError):
    """A round trip refused before any byte of it was written (past TickPipeline.MAX_OPEN): an
    outage to its callers, but none of its commands can run later."""


class TickPipeline:
    """Redis commands that any coroutine issues within one event-loop tick leave together, as one
    pipeline: under load the claims of new batches and the settlements of earlier ones share a
    round trip. No timer: the flush runs at the end of the tick in which the first was queued.
    Except for what may wait (`run(..., within_s=)`: the acks of answered messages): it leaves with
    the next round trip anyway, or after `within_s` when none comes, so at one call in flight a
    message's settlement rides with the next message's claim instead of costing a round trip.

    A round trip is packed by hiredis and written and read on redis-py connections this pipeline
    keeps (redis-py's handshake, reply parser and errors), not through redis-py's Pipeline: that
    costs ~150-210 µs of client CPU per round trip here (pool checkout and release under a lock, a
    readiness probe of the socket, a task per write, a timer per reply, its Python packer), this
    ~80-110 µs, and a unary call at 1 in flight makes two round trips
    (benchmarks/redis_round_trip.py; RESULTS.md, seventeenth session). Replies are Redis's own,
    without redis-py's response callbacks (EXPIRE answers 1, not True).

    Errors are redis-py's: one socket timeout (the client's) bounds each attempt of a round trip
    (connect, handshake, write and every reply) and a timeout is not retried; a connection Redis
    closed (a restart: every kept connection fails once) is retried once on a new socket, as the
    client's Retry does for its other commands (see IngressServer), so a round trip takes at most
    two timeouts. A connection whose round trip failed or was cancelled is closed, so no late reply
    of it is ever read as another round trip's. After a timeout every kept connection is closed (a
    Redis that stopped answering, or an address that now drops packets, would time each of them
    out in turn), and a connection unused for IDLE_CLOSE_S is closed."""

    # At most this many connections open at once (as many as round trips under way: ticks
    # overlap while Redis answers); past it a round trip is refused "Too many connections", an
    # outage, as redis-py's pool refuses past its max_connections. Its own budget, beside the
    # client pool's 512 (IngressServer) and the live streams' 64.
    MAX_OPEN = 256
    IDLE_CLOSE_S = 60.0

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._queued: list[tuple[Callable[[Any], None], int, asyncio.Future[list[Any]]]] = []
        self._scheduled = False
        # Queued with a delay allowed (run's within_s), and the timer that sends them if nothing
        # else does first.
        self._waiting: list[tuple[Callable[[Any], None], int, asyncio.Future[list[Any]]]] = []
        # (uvloop's call_at hands back a plain Handle, without `when()`, for a delay under 0.5 ms:
        # the timer's due time is kept here.)
        self._waiting_timer: asyncio.Handle | None = None
        self._waiting_due = 0.0
        # Scripts by SHA1: an EVALSHA of one of these that Redis answers NOSCRIPT is sent again
        # after a SCRIPT LOAD (see _with_scripts_loaded).
        self.scripts: dict[str, str] = {}
        self._running: set[asyncio.Task[None]] = set()
        # Connections between round trips: all are kept (as a pool keeps what is released), so
        # overlapping ticks do not open and close sockets.
        # (connection, when it was last used), the most recently used last.
        self._idle: list[tuple[Any, float]] = []
        self._open = 0
        self._closed = False
        # The client's socket timeout, or redis-py's default socket timeout: never none at all.
        self._timeout_s: float = redis.connection_pool.connection_kwargs.get("socket_timeout") or 5.0

    def run(
        self, queue: Callable[[Any], None], count: int, within_s: float = 0.0
    ) -> asyncio.Future[list[Any]]:
        """`queue(pipe)` adds `count` commands (see _Commands); the future gets their raw replies
        (an error reply as its exception object), or the exception that failed the round trip.
        With `within_s`, the commands may wait that long for another round trip to join."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        # Once a round trip is due at the end of this tick, what may wait joins it instead, after
        # what was queued before it: every round trip sends its commands in the order issued.
        if within_s > 0 and not self._closed and not self._scheduled:
            # The earliest bound of those waiting is kept.
            due = loop.time() + within_s
            if self._waiting_timer is None or due < self._waiting_due:
                if self._waiting_timer is not None:
                    self._waiting_timer.cancel()
                self._waiting_timer, self._waiting_due = loop.call_at(due, self._send_waiting), due
            self._waiting.append((queue, count, future))
            return future
        self._queued.append((queue, count, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _send_waiting(self) -> None:
        self._waiting_timer = None
        if self._waiting and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        queued, self._queued = self._queued, []
        if self._waiting:
            # All issued before anything queued: see run.
            queued = self._waiting + queued
            self._waiting = []
            if self._waiting_timer is not None:
                self._waiting_timer.cancel()
                self._waiting_timer = None
        if not queued:  # close() sent what waited
            return
        task = asyncio.ensure_future(self._execute(queued))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _execute(
        self, queued: list[tuple[Callable[[Any], None], int, asyncio.Future[list[Any]]]]
    ) -> None:
        # Each caller's commands are packed apart: one that cannot be (an argument of a type
        # Redis has no encoding for) fails alone, not the others' commands that share its trip.
        pipe = _Commands()
        packed: list[bytes] = []
        sent: list[tuple[Callable[[Any], None], int, asyncio.Future[list[Any]]]] = []
        for entry in queued:
            queue, _, future = entry
            start = len(pipe.commands)
            try:
                queue(pipe)
                packed.append(b"".join([hiredis.pack_command(command) for command in pipe.commands[start:]]))
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    # Not a caller's own failure: no one of this round trip is left unanswered.
                    for _, _, waiter in queued:
                        if not waiter.done():
                            waiter.set_exception(exc)
                    raise
                del pipe.commands[start:]
                if isinstance(exc, TypeError):
                    exc = DataError(f"a Redis command argument of an unsupported type: {exc}")
                if not future.done():
                    future.set_exception(exc)
                continue
            sent.append(entry)
        if not sent:
            return
        try:
            replies = await self._round_trip(b"".join(packed), len(pipe.commands))
        except BaseException as exc:
            for _, _, future in sent:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        try:
            replies = await self._with_scripts_loaded(pipe.commands, replies)
        finally:
            # Every reply of the first round trip stands, whatever happens to the calls sent
            # again (see _with_scripts_loaded).
            at = 0
            for _, count, future in sent:
                if not future.done():
                    future.set_result(replies[at : at + count])
                at += count

    async def _with_scripts_loaded(self, commands: list[tuple[Any, ...]], replies: list[Any]) -> list[Any]:
        """`replies`, with the EVALSHA calls Redis did not know the script of (its first use on
        this Redis, or Redis restarted) sent again after loading their scripts (see `scripts`).
        Done here, not by each caller: a caller that is gone (cancelled) still has its call run."""
        missing = [
            n
            for n, reply in enumerate(replies)
            if isinstance(reply, NoScriptError)
            and commands[n][0] == "EVALSHA"
            and commands[n][1] in self.scripts
        ]
        if not missing:
            return replies
        shas = list(dict.fromkeys(commands[n][1] for n in missing))
        again = [("SCRIPT", "LOAD", self.scripts[sha]) for sha in shas] + [commands[n] for n in missing]
        # Until their replies come, the calls sent again may have run: cut off here (cancelled),
        # their callers get an error of unknown outcome, as for any round trip cut off after it
        # was written, not the NOSCRIPT refusal (a claim's caller then drops the claim it made).
        for n in missing:
            replies[n] = RedisConnectionError("a script call sent again was cut off; it may have run")
        try:
            more = await self._round_trip(b"".join([hiredis.pack_command(c) for c in again]), len(again))
        except Exception as exc:
            # The calls sent again failed with it; the others' replies stand.
            more = [exc] * len(again)
        for n, reply in zip(missing, more[len(shas) :], strict=True):
            replies[n] = reply
        return replies

    async def _round_trip(self, packed: bytes, count: int) -> list[Any]:
        """The replies to `count` commands packed in `packed`, on one kept connection."""
        if self._idle:
            conn, _ = self._idle.pop()
        elif self._open >= self.MAX_OPEN:
            raise NothingSent("Too many connections")
        else:
            pool = self._redis.connection_pool
            # Without redis-py's per-operation timeout: one deadline covers the attempt below.
            conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
            self._open += 1
        try:
            for attempt in (1, 2):
                try:
                    async with asyncio.timeout(self._timeout_s):
                        replies = await self._send(conn, packed, count)
                    break
                except TimeoutError as exc:
                    raise RedisTimeoutError(
                        f"Redis did not answer {count} commands within {self._timeout_s}s"
                    ) from exc
                except (RedisConnectionError, RuntimeError) as exc:
                    # A connection Redis closed: a ConnectionError, or uvloop's refusal to write
                    # on it (services/outages.py). Once more, on a new socket.
                    if attempt == 2 or not (isinstance(exc, RedisConnectionError) or closed_transport(exc)):
                        raise
                    await _disconnected(conn)
        except BaseException as exc:
            self._open -= 1
            await _disconnected(conn)
            if isinstance(exc, RedisTimeoutError):
                await self._close_idle(len(self._idle))
            raise
        if self._closed:
            self._open -= 1
            await _disconnected(conn)
            return replies
        now = time.monotonic()
        self._idle.append((conn, now))
        stale = next((n for n, (_, used) in enumerate(self._idle) if now - used < self.IDLE_CLOSE_S), 0)
        if stale:
            await self._close_idle(stale)
        return replies

    async def _close_idle(self, count: int) -> None:
        """Close the `count` least recently used kept connections."""
        idle, self._idle = self._idle[:count], self._idle[count:]
        self._open -= len(idle)
        for conn, _ in idle:
            await _disconnected(conn)

    @staticmethod
    async def _send(conn: Any, packed: bytes, count: int) -> list[Any]:
        if not conn.is_connected:
            await conn.connect()
        await conn.send_packed_command(packed, check_health=False)
        replies: list[Any] = []
        for _ in range(count):
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies

    async def close(self) -> None:
        """Close the kept connections; those of round trips under way close when they end. What
        waits for company (run's within_s) is sent first, and close returns once it has its
        replies (or its error)."""
        self._closed = True
        if self._waiting_timer is not None:
            self._waiting_timer.cancel()
            self._waiting_timer = None
        # With a flush due (a command queued since), what is queued leaves with what waited, after
        # it, in one round trip: sent on two connections at once, Redis may run either first.
        waiting, self._waiting = self._waiting, []
        if waiting:
            waiting += self._queued
            self._queued = []
        try:
            if waiting:
                await self._execute(waiting)
        finally:
            await self._close_idle(len(self._idle))


async def _disconnected(conn: Any) -> None:
    try:
        await conn.disconnect(nowait=True)
    except Exception as exc:
        log.debug("closing a Redis connection: %r", exc)


def rebuilding() -> Unavailable:
    return unavailable(
        "the hot view is being rebuilt after Redis lost data (idempotency claims come back from the log "
        "first); writes are refused until it is complete — retry after the retry-after-ms trailer"
    )


def unknown_while_rebuilding(tenant_id: str, conversation_id: str) -> Unavailable:
    """A conversation the hot view does not have while it is incomplete may well exist (it has not
    come back yet): UNAVAILABLE, never NOT_FOUND, which a client takes as permanent."""
    return unavailable(
        f"conversation {conversation_id!r} of tenant {tenant_id!r} is unknown while the hot view is "
        "being rebuilt after Redis lost data; it may exist — retry after the retry-after-ms trailer"
    )


# How long a claim on a client_message_id may stay unresolved (the produce timeout plus margin)
# before a retry may write again.
CLAIM_TTL_S = 120
# An ingress process's lease (hv.INGRESS_LEASES_KEY), renewed every LEASE_RENEW_S: a retry takes a
# claim of a process that died mid-write over this long after its last renewal, not CLAIM_TTL_S.
# A process whose renewals failed for LEASE_FRESH_S (Redis away from it, its loop stalled) hands
# no claimed message to Kafka: another process may be taking its claims over by then.
LEASE_S = 10.0
LEASE_RENEW_S = 1.0
LEASE_FRESH_S = LEASE_S - 4 * LEASE_RENEW_S
# A blocking live read waits this long for new entries, then loops. Its connection's socket
# timeout must exceed it, or an idle StreamConversation fails with TimeoutError on its own wait.
LIVE_BLOCK_MS = 5_000
LIVE_SOCKET_TIMEOUT_S = LIVE_BLOCK_MS / 1000 + 10


def live_pool(redis_url: str, max_connections: int) -> aioredis.Redis:
    """The pool for live streams' short reads and wake-ups, apart from the write path's so
    watchers cannot starve it. A blocking pool: a flood of StreamConversation opens waits for a
    connection (at most the socket timeout) instead of failing with "Too many connections".

    A dropped connection is retried once, as on the write path's pool: after a Redis restart
    every pooled connection fails once, and without the retry each failed the next
    StreamConversation that drew it, minutes later (crash rehearsal 4). Its commands are reads."""
    pool = aioredis.BlockingConnectionPool.from_url(
        redis_url,
        max_connections=max_connections,
        timeout=LIVE_SOCKET_TIMEOUT_S,
        socket_timeout=LIVE_SOCKET_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    return aioredis.Redis(connection_pool=pool)


@dataclass(frozen=True, slots=True)
class Registration:
    created_ns: int
    closed_ns: int
    channel: int
    customer_id: str
    state_json: bytes | None
    cursor: str


class HeldClaim(NamedTuple):
    """A claim this attempt holds: its key, and the pending marker it set (unique per attempt)."""

    tenant_id: str
    conversation_id: str
    client_message_id: str
    marker: bytes
    # In the conversation's in-flight set (a message claimed unless_closed): settling removes it.
    in_flight: bool = False

    @property
    def redis_key(self) -> str:
        return hv.idempotency_key(self.tenant_id, self.conversation_id, self.client_message_id)

    @property
    def in_flight_key(self) -> str:
        return hv.inflight_key(self.tenant_id, self.conversation_id)

    @property
    def in_flight_member(self) -> bytes:
        return self.marker + self.redis_key.encode()


@dataclass(frozen=True, slots=True)
class Claim:
    """Outcome of claiming a client_message_id: first writer, earlier ack, or a write still in flight."""

    claimed: bool
    earlier: Ack | None = None
    # The conversation is closed: nothing was claimed (claim_many(..., unless_closed=True)).
    closed: bool = False
    # A close of the conversation is under way (in some process): nothing was claimed; retry.
    closing: bool = False
    # The pending value this attempt set (when `claimed`): only it may drop the claim again.
    marker: bytes = hv.CLAIM_PENDING
    # Claimed into the conversation's in-flight set (claim_many(..., unless_closed=True)).
    tracked: bool = False
    # Pending in an attempt of a process whose lease ran out or was ended (a close's: ended), or
    # with `closing`, held by the close of a process whose lease was ended: see _take_over.
    orphaned: bool = False

    @property
    def in_flight(self) -> bool:
        return not self.claimed and self.earlier is None and not self.closed and not self.closing

    def held(self, key: tuple[str, str, str]) -> HeldClaim:
        return HeldClaim(key[0], key[1], key[2], self.marker, self.tracked)


def _raise_any(replies: list[Any]) -> None:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


def _parse_ack(raw: bytes) -> Ack | None:
    if raw.startswith(hv.CLAIM_PENDING):  # "pending:<attempt>": still in flight
        return None
    decoded = hv.decode_claim(raw)
    return Ack(*decoded) if decoded is not None else None


def new_lease_id() -> str:
    return os.urandom(6).hex()


def marker_prefix(lease_id: str) -> bytes:
    """What starts every claim marker of the process holding `lease_id` (hv.MARKER_PREFIX_LEN)."""
    if len(lease_id) != 12 or any(c not in "0123456789abcdef" for c in lease_id):
        raise ValueError(f"a lease id is 12 lowercase hex digits, not {lease_id!r}")
    return hv.CLAIM_PENDING + b":" + lease_id.encode()


# End a lease only if it has not been renewed for ARGV[2] ms (KEYS: the leases hash; ARGV: marker
# prefix, ms, forget ms): 1 ended (or ended already), 0 renewed lately (its process is alive), -1
# unknown (forgotten, or never there).
_END_IF_STALE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then
  return -1
end
current = tonumber(current)
if current < 0 then
  return 1
end
-- A renewal sets now + LEASE_S: renewed within ARGV[2] ms means current > now + LEASE_S - ARGV[2].
if current - tonumber(ARGV[3]) > now - tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], -now)
return 1
"""
# A lease found in an earlier run's record is ended only once it has not been renewed for this
# long: past LEASE_FRESH_S its process (were it alive, only stalled) hands nothing more to Kafka.
END_STALE_AFTER_S = LEASE_FRESH_S + 1.0


async def end_lease_if_stale(redis: aioredis.Redis, lease_id: str) -> int:
    """End the lease of a process believed gone, unless Redis saw it renewed within
    END_STALE_AFTER_S (then it is alive, whatever pids or clocks said): 1 ended, 0 alive, -1
    unknown."""
    return int(
        await redis.eval(
            _END_IF_STALE,
            1,
            hv.INGRESS_LEASES_KEY,
            marker_prefix(lease_id),
            int(END_STALE_AFTER_S * 1000),
            int(LEASE_S * 1000),
        )
    )


async def end_lease(redis: aioredis.Redis, lease_id: str) -> None:
    """The process holding `lease_id` is gone (its supervisor saw it exit): its claims may be
    taken over from now on, not only once its lease runs out."""
    await redis.eval(
        _RENEW_LEASE, 1, hv.INGRESS_LEASES_KEY, marker_prefix(lease_id), 0, 2 * CLAIM_TTL_S * 1000
    )


class IngressHotView:
    def __init__(
        self,
        redis: aioredis.Redis,
        idempotency_ttl_s: int,
        live_redis: aioredis.Redis | None = None,
        lease_id: str | None = None,
    ) -> None:
        self._redis = redis
        # Blocking stream reads hold a connection each: they get a pool of their own so that
        # many watchers can never starve the write path.
        self._live = live_redis or redis
        self._ttl = idempotency_ttl_s
        self._claim_if_ready = redis.register_script(_CLAIM_IF_READY)
        self._claim_open_if_ready = redis.register_script(_CLAIM_OPEN_IF_READY)
        self._hold_for_close = redis.register_script(_HOLD_FOR_CLOSE)
        self._reserve_open = redis.register_script(_RESERVE_OPEN)
        self._settle_script = redis.register_script(_SETTLE)
        self._renew_lease = redis.register_script(_RENEW_LEASE)
        # Whether this view ever asked for a lease (IngressServer does before it serves), and the
        # monotonic time its last successful renewal was sent.
        self._leased = False
        self._lease_renewed = -float("inf")
        # Its lease was ended by another process (see renew_lease): never fresh again.
        self._lease_lost = False
        self._tick = TickPipeline(redis)
        # Starts every claim marker of this instance (one per ingress process): a close tells its
        # own process's in-flight messages from other processes' by it.
        # Its lease's id (`lease_id`: 12 hex digits a supervisor chose, so that it can end the
        # lease once the process died; else random) follows the ":".
        self._marker_prefix = marker_prefix(lease_id or new_lease_id())
        self._releasing: set[asyncio.Task[None]] = set()  # see _release_unanswered

    async def close(self) -> None:
        """Close the connections of this view's own (the client's pool is its owner's to close)."""
        await self._tick.close()

    async def renew_lease(self, lease_s: float = LEASE_S) -> None:
        """This process is alive for `lease_s` more (0: its lease ends for good, as it stops: call
        it only once its producer is stopped)."""
        sent = time.monotonic()
        self._leased = True  # from the moment it is sent: Redis may have it, answered or not
        renewed = await self._renew_lease(
            keys=[hv.INGRESS_LEASES_KEY],
            args=[self._marker_prefix, int(lease_s * 1000), 2 * CLAIM_TTL_S * 1000],
        )
        if lease_s > 0 and int(renewed) == 0 and not self._lease_lost:
            # Ended by someone who took this process for dead (a supervisor, or a restarted one
            # reading an earlier run's record): others may take its claims and finish its
            # closes, so it hands nothing claimed to Kafka any more. Restart it.
            self._lease_lost = True
            log.error(
                "this ingress process's lease was ended by another process that took it for dead: it "
                "refuses writes from now on (UNAVAILABLE); restart it"
            )
        if lease_s > 0 and not self._lease_lost:
            self._lease_renewed = max(self._lease_renewed, sent)

    async def keep_lease(self) -> None:
        """Renew the lease every LEASE_RENEW_S until cancelled (a failure is logged once per outage)."""
        failing = False
        while True:
            try:
                await self.renew_lease()
                if failing:
                    log.info("ingress lease renewed again")
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("renewing this ingress process's lease failed: %r", exc)
                failing = True
            await asyncio.sleep(LEASE_RENEW_S)

    def lease_fresh(self) -> bool:
        """Whether no other process can have taken this one's claims over (see LEASE_FRESH_S).
        A view that never asked for a lease has claims no one takes over (no lease is not dead)."""
        if self._lease_lost:
            return False
        return not self._leased or time.monotonic() - self._lease_renewed < LEASE_FRESH_S

    async def lookup_many(self, keys: Sequence[tuple[str, str]]) -> list[Registration | None]:
        fields = (hv.F_CREATED_NS, hv.F_CLOSED_NS, hv.F_CHANNEL, hv.F_CUSTOMER, hv.F_STATE, hv.F_CURSOR)
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant_id, conversation_id in keys:
                pipe.hmget(hv.conversation_key(tenant_id, conversation_id), fields)
            rows = await pipe.execute()
        found: list[Registration | None] = []
        for created, closed, channel, customer, state, cursor in rows:
            if created is None and state is None:
                found.append(None)
                continue
            found.append(
                Registration(
                    created_ns=int(created or 0),
                    closed_ns=int(closed or 0),
                    channel=int(channel or 0),
                    customer_id=(customer or b"").decode(),
                    state_json=state,
                    cursor=(cursor or b"").decode(),
                )
            )
        return found

    async def lookup(self, tenant_id: str, conversation_id: str) -> Registration | None:
        return (await self.lookup_many([(tenant_id, conversation_id)]))[0]

    async def register(
        self, tenant_id: str, conversation_id: str, *, created_ns: int, channel: int, customer_id: str
    ) -> None:
        await self._redis.hset(
            hv.conversation_key(tenant_id, conversation_id),
            mapping={hv.F_CREATED_NS: created_ns, hv.F_CHANNEL: channel, hv.F_CUSTOMER: customer_id},
        )

    async def mark_closed(self, tenant_id: str, conversation_id: str, closed_ns: int) -> None:
        """The close is durable: closed for good (and the close's hold is no longer needed)."""
        key = hv.conversation_key(tenant_id, conversation_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, hv.F_CLOSED_NS, closed_ns)
            pipe.hdel(key, hv.F_CLOSING)
            await pipe.execute()
        # Its place among the tenant's open conversations is free (the worker removes it too when
        # it folds the close; another hash tag, so not in the transaction above).
        await self._redis.zrem(hv.open_conversations_key(tenant_id), conversation_id)

    async def reserve_open(self, tenant_id: str, conversation_id: str, quota: int) -> tuple[bool, int]:
        """A place for a conversation about to start among the tenant's open ones, unless `quota`
        are open: (granted, how many are open). Expires with a claim unless the start is folded."""
        granted, count = await self._reserve_open(
            keys=[hv.open_conversations_key(tenant_id)], args=[quota, conversation_id, CLAIM_TTL_S * 1000]
        )
        return bool(granted), int(count)

    async def confirm_open(self, tenant_id: str, conversation_id: str) -> None:
        """The start is durable: its reservation no longer expires (XX: a close folded since,
        which removed it, is not undone)."""
        await self._redis.zadd(hv.open_conversations_key(tenant_id), {conversation_id: 0}, xx=True)

    async def release_open(self, tenant_id: str, conversation_id: str) -> None:
        """A reserved start that did not happen."""
        await self._redis.zrem(hv.open_conversations_key(tenant_id), conversation_id)

    async def hold_for_close(self, tenant_id: str, conversation_id: str, owner: bytes) -> int:
        """Refuse sends of the conversation in every ingress process from now on (for a claim
        TTL, or until `release_close`/`mark_closed`); returns how many of its messages claimed by
        other processes are not settled yet. Called again, it renews the hold."""
        return int(
            await self._hold_for_close(
                keys=[
                    hv.conversation_key(tenant_id, conversation_id),
                    hv.inflight_key(tenant_id, conversation_id),
                    hv.INGRESS_LEASES_KEY,
                ],
                args=[hv.F_CLOSING, CLAIM_TTL_S * 1000, self._marker_prefix, owner, hv.MARKER_PREFIX_LEN],
            )
        )

    async def release_close(self, tenant_id: str, conversation_id: str, owner: bytes) -> None:
        """The close did not happen (Kafka refused it, or it gave up): sends may go on, unless
        the hold is another close attempt's by now (one that claimed the close since)."""
        await self._redis.eval(
            _RELEASE_IF_MINE, 1, hv.conversation_key(tenant_id, conversation_id), hv.F_CLOSING, owner
        )

    async def clear_closed(self, tenant_id: str, conversation_id: str) -> None:
        await self._redis.hdel(hv.conversation_key(tenant_id, conversation_id), hv.F_CLOSED_NS)

    async def applied_offsets(self, partitions: Sequence[int]) -> dict[int, int]:
        """The next offset the sessions worker applies, of each partition it has a position for."""
        values = await self._redis.hmget(hv.APPLIED_KEY, [str(p) for p in partitions])
        return {p: int(v) for p, v in zip(partitions, values, strict=True) if v is not None}

    async def is_ready(self, partitions: int) -> bool:
        """Whether the sessions worker has marked every partition's hot view complete."""
        return int(await self._redis.hlen(hv.READY_KEY)) >= partitions

    async def claim_many(
        self,
        keys: Sequence[tuple[str, str, str]],
        partitions: int = 0,
        *,
        unless_closed: bool = False,
        take_over: bool = False,
        dead_if_ended: bool = False,
    ) -> list[Claim]:
        """Claim each (tenant, conversation, client_message_id) for writing, in one round trip
        (shared with whatever else this tick sends) and only while the hot view is complete
        (`partitions` > 0: raises UNAVAILABLE otherwise). `unless_closed`: a key of a closed
        conversation is not claimed but answered Claim(closed=True). A key pending in a dead
        process's attempt is answered Claim(orphaned=True), or with `take_over` claimed from it;
        a message of a conversation held by a dead process's close (unless_closed) is answered
        Claim(closing=True, orphaned=True), take_over or not. `dead_if_ended` (closes): only a
        process whose lease was ended is dead, not one whose lease ran out."""
        if not keys:
            return []
        # One marker per call (one attempt of each key): settling compares against it.
        marker = self._marker_prefix + os.urandom(8).hex().encode()
        if unless_closed:
            script = self._claim_open_if_ready
            redis_keys = [hv.READY_KEY, hv.INGRESS_LEASES_KEY]
            for t, c, m in keys:
                redis_keys += (hv.conversation_key(t, c), hv.idempotency_key(t, c, m), hv.inflight_key(t, c))
            args: list[Any] = [
                partitions,
                marker,
                CLAIM_TTL_S,
                hv.F_CLOSED_NS,
                hv.F_CLOSING,
                hv.MARKER_PREFIX_LEN,
                "1" if take_over else "0",
            ]
        else:
            script = self._claim_if_ready
            redis_keys = [
                hv.READY_KEY,
                hv.INGRESS_LEASES_KEY,
                *(hv.idempotency_key(t, c, m) for t, c, m in keys),
            ]
            args = [
                partitions,
                marker,
                CLAIM_TTL_S,
                hv.MARKER_PREFIX_LEN,
                "1" if take_over else "0",
                "1" if dead_if_ended else "0",
            ]
        try:
            reply = await self._in_tick(script, redis_keys, args)
        except NothingSent:
            raise  # refused before it was written: no claim of it can appear later
        except (RedisConnectionError, RedisTimeoutError):
            self._release_unanswered([HeldClaim(t, c, m, marker, unless_closed) for t, c, m in keys])
            raise
        if reply == -1:
            raise rebuilding()
        claims = []
        for previous in reply:
            if previous is None:
                claims.append(Claim(claimed=True, marker=marker, tracked=unless_closed))
            elif previous == 0:
                claims.append(Claim(claimed=False, closed=True))
            elif previous == 1:
                claims.append(Claim(claimed=False, closing=True))
            elif previous == 2:  # held by a close of a dead process
                claims.append(Claim(claimed=False, closing=True, orphaned=True))
            elif previous.startswith(b"orphaned:"):
                claims.append(Claim(claimed=False, orphaned=True))
            else:
                claims.append(Claim(claimed=False, earlier=_parse_ack(previous)))
        return claims

    def _release_unanswered(self, claims: list[HeldClaim]) -> None:
        """A claim script sent without an answer may still run: a Redis that stopped answering
        (SIGSTOP, a long command) runs what was sent on an open connection once it resumes, after
        the caller was told UNAVAILABLE. Its ids would stay pending under a marker nobody holds,
        refusing every retry as "in flight" until CLAIM_TTL_S. Nothing is ever written under that
        marker, so its claims are dropped once Redis answers (a drop removes only that marker's)."""
        task = asyncio.ensure_future(self._release(claims))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release(self, claims: list[HeldClaim]) -> None:
        outcomes: list[tuple[HeldClaim, Ack | None]] = [(c, None) for c in claims]
        give_up = time.monotonic() + CLAIM_TTL_S  # by then the claims expired by themselves
        delay = 0.2
        while True:
            try:
                await self.settle_many(outcomes)
                break
            except Exception as exc:
                if time.monotonic() + delay > give_up:
                    log.warning("dropping %d unanswered claims failed (%r); they expire", len(claims), exc)
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        # Once more a moment later: the drop that succeeded may have been sent while Redis was
        # still stopped, on another connection, and Redis does not promise to read connections
        # in the order they were written to.
        await asyncio.sleep(1.0)
        try:
            await self.settle_many(outcomes)
        except Exception as exc:
            log.warning("dropping %d unanswered claims again failed (%r)", len(claims), exc)

    async def _in_tick(
        self, script: Any, keys: Sequence[str], args: Sequence[Any], within_s: float = 0.0
    ) -> Any:
        """A script's reply, its call sent in this tick's pipeline (EVALSHA; the pipeline loads
        it on first use), or with a later one within `within_s` (TickPipeline.run)."""
        if script.sha not in self._tick.scripts:
            self._tick.scripts[script.sha] = script.script
        (reply,) = await self._tick.run(
            lambda pipe: pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args), 1, within_s
        )
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def touch_claims(self, keys: Sequence[HeldClaim]) -> None:
        """Extend claims whose write is still in flight (they expire only if this process dies),
        their in-flight entries, and a close's hold; a claim settled meanwhile is left alone."""
        if not keys:
            return

        def queue(pipe: Any) -> None:
            for key in keys:
                # EVAL, not EVALSHA: touches are rare (Kafka slower than a third of the TTL).
                pipe.execute_command(
                    "EVAL",
                    _TOUCH_IF_PENDING,
                    3,
                    key.redis_key,
                    key.in_flight_key,
                    hv.conversation_key(key.tenant_id, key.conversation_id),
                    key.marker,
                    CLAIM_TTL_S * 1000,
                    key.in_flight_member if key.in_flight else "",
                    "1" if key.client_message_id == hv.CLOSE_CLAIM else "0",
                    hv.F_CLOSING,
                )

        _raise_any(await self._tick.run(queue, len(keys)))

    async def settle_many(
        self, outcomes: Sequence[tuple[HeldClaim, Ack | None]], *, within_s: float = 0.0
    ) -> None:
        """Record acks (a retry then gets the first ack) and drop claims whose write failed, and
        take each out of its conversation's in-flight set (a close waiting for it may go on); one
        script call in the round trip of whatever else this tick sends (see `_SETTLE`), or with
        `within_s`, of the next round trip within that time."""
        if not outcomes:
            return
        keys: list[str] = []
        in_flight: list[str] = []
        args: list[Any] = [self._ttl, len(outcomes)]
        for held, ack in outcomes:
            keys.append(held.redis_key)
            in_flight.append(held.in_flight_key)
            args += (
                hv.encode_claim(ack.event_id, ack.partition, ack.offset, ack.digest)
                if ack is not None
                else "",
                held.marker,
                "1" if held.in_flight else "0",
            )
        keys += in_flight
        await self._in_tick(self._settle_script, keys, args, within_s)

    async def recent_entries(
        self, tenant_id: str, conversation_id: str, count: int, until: str = "+"
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The last `count` live-stream entries up to and including the id `until`."""
        entries: Any = await self._redis.xrevrange(
            hv.live_stream_key(tenant_id, conversation_id), max=until, count=count
        )
        return list(reversed(entries))

    async def live_window(self, tenant_id: str, conversation_id: str) -> tuple[str | None, str | None]:
        """(the oldest entry id still in the live stream if older entries were trimmed, else None;
        the last id the stream ever had, None while it has none)."""
        try:
            info: Any = await self._redis.xinfo_stream(hv.live_stream_key(tenant_id, conversation_id))
        except ResponseError:  # no such stream yet
            return None, None
        last = _text(info.get("last-generated-id"))
        if int(info.get("entries-added", 0)) <= int(info.get("length", 0)) or not info.get("first-entry"):
            return None, last
        return _text(info["first-entry"][0]), last

    async def read_live(
        self, tenant_id: str, conversation_id: str, after: str, block_ms: int, count: int = 500
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply: Any = await self._live.xread(
            {hv.live_stream_key(tenant_id, conversation_id): after}, block=block_ms, count=count
        )
        if not reply:
            return []
        return list(reply[0][1])


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
