"""Replay into the Redis hot view: a scratch logical database, then `SWAPDB`.

The sessions worker's own processor (`SessionsProcessor.process`: read states, pure fold, one
pipeline of states, live streams, claims, queues and positions) runs against a scratch database
(`settings.replay_redis_db`), so the rebuilt view is what the worker itself would build from the
log. Positions are set to the replay's end offsets and the readiness keys are left out.

The swap is one MULTI/EXEC: every live key the rebuild does not have (conversations and claims
newer than the replay, knowledge documents, reply deltas) is copied into the scratch database,
then `SWAPDB` exchanges the two. It needs the sessions worker stopped (checked through its
consumer group): the worker resumes from the positions in Redis, i.e. from the replay's end, and
folds what came after; the fold skips what a state already has. Until it is back and marks the
partitions ready, the ingress refuses writes (UNAVAILABLE + retry-after), so no retry can miss an
idempotency claim; reads are served from the rebuilt view at once. The previous hot view stays in
the scratch database until the next replay (a rollback is another SWAPDB).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlparse

import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient

import services.kafka_clients  # noqa: F401  (throttles aiokafka's failed metadata updates)
from schemas import hotview as hv
from services.settings import Settings
from streams._consumer import Record
from streams.privacy.erasures import ONE_SHOT_BOUND_S, ErasureFollower
from streams.sessions import ConversationState
from streams.sessions._worker import SessionsProcessor


def live_db(settings: Settings) -> int:
    parsed = urlparse(settings.redis_url)
    if parsed.scheme == "unix":
        value = dict(parse_qsl(parsed.query)).get("db", "0")
    else:
        value = parsed.path.strip("/") or "0"
    return int(value) if value.isdigit() else 0


def redis_for(settings: Settings, db: int) -> aioredis.Redis:
    # The database in the URL (path, or ?db= for unix sockets) wins over a `db=` argument in
    # redis-py, so the URL itself is rewritten.
    parsed = urlparse(settings.redis_url)
    if parsed.scheme == "unix":
        query = {k: v for k, v in parse_qsl(parsed.query) if k != "db"}
        url = parsed._replace(query=urlencode({**query, "db": str(db)})).geturl()
    else:
        url = parsed._replace(path=f"/{db}").geturl()
    return aioredis.Redis.from_url(url, socket_timeout=60)


class SessionsTarget:
    def __init__(self, settings: Settings, scratch: aioredis.Redis) -> None:
        self.scratch = scratch
        # With the live worker's erasure registry: a replay never brings an erased customer back.
        self._erasures = ErasureFollower(settings, start_timeout_s=ONE_SHOT_BOUND_S)
        self._processor = SessionsProcessor(settings, scratch, self._erasures)

    async def apply(self, records: Sequence[Record]) -> tuple[int, int]:
        rejected = await self._processor.process(records)
        return len(records) - len(rejected), len(rejected)

    async def finish(self, ends: dict[int, int]) -> None:
        """Positions = the replay's end offsets (every record before them is folded, including
        those the fold refused, as the live worker does); no readiness keys (see module doc)."""
        await self._erasures.stop()
        if ends:
            await self.scratch.hset(hv.APPLIED_KEY, mapping={str(p): o for p, o in ends.items()})
        await self.scratch.delete(hv.READY_KEY)


async def prepare_scratch(settings: Settings) -> aioredis.Redis:
    scratch_db = settings.replay_redis_db
    if scratch_db == live_db(settings):
        raise ValueError(
            f"SWITCHBOARD_REPLAY_REDIS_DB={scratch_db} is the live database of SWITCHBOARD_REDIS_URL; pick another"
        )
    scratch = redis_for(settings, scratch_db)
    await scratch.flushdb()
    return scratch


async def group_members(settings: Settings, group: str) -> int:
    """How many consumers are in a consumer group right now."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="switchboard-replay")
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([group])
        members = 0
        for response in described:
            for g in response.groups:
                # (error_code, group_id, state, protocol_type, protocol, members, ...)
                members += len(g[5])
        return members
    finally:
        await admin.close()


async def swap_into_live(settings: Settings, scratch: aioredis.Redis) -> int:
    """Carry the live keys the rebuild lacks into it, then SWAPDB, in one transaction; returns
    how many keys were carried over."""
    live = redis_for(settings, live_db(settings))
    try:
        carried = 0
        async with live.pipeline(transaction=True) as tx:
            missing: list[bytes] = []
            async for key in live.scan_iter(count=1000):
                if key in (hv.APPLIED_KEY.encode(), hv.READY_KEY.encode()):
                    continue
                missing.append(key)
            exists = await _exists_many(scratch, missing)
            for key, there in zip(missing, exists, strict=True):
                if not there:
                    tx.copy(key, key, destination_db=str(settings.replay_redis_db))  # type: ignore[arg-type]
                    carried += 1
            tx.swapdb(live_db(settings), settings.replay_redis_db)
            await tx.execute()
        return carried
    finally:
        await live.aclose()


async def _exists_many(redis: aioredis.Redis, keys: list[bytes]) -> list[bool]:
    out: list[bool] = []
    for i in range(0, len(keys), 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys[i : i + 1000]:
                pipe.exists(key)
            out.extend(bool(v) for v in await pipe.execute())
    return out


async def hot_view_snapshot(redis: aioredis.Redis, tenant: str | None = None) -> dict[str, Any]:
    """What the sessions fold owns, comparable across databases: each conversation's state, its
    live stream (ids and fields) and the agents' queues. Claims are left out: their expiry is
    computed from the wall clock at write time. States and entries written by an older version
    (client message ids in full, whole events) are compared in today's layout."""
    snapshot: dict[str, Any] = {}
    async for raw in redis.scan_iter(match=f"sb:{{{tenant}*" if tenant else "sb:{*", count=1000):
        key = raw.decode()
        if tenant and not of_tenant(key, tenant):
            continue
        if key.endswith(":conv"):
            state = await redis.hget(key, hv.F_STATE)
            if state is not None:
                snapshot[key] = ConversationState.from_json(json.loads(state)).to_json()
        elif key.endswith(":live"):
            entries: Any = await redis.xrange(key)
            event = hv.S_EVENT.encode()
            snapshot[key] = [
                (
                    bytes(i).decode(),
                    sorted((k, hv.compact_live_event(v) if k == event else v) for k, v in f.items()),
                )
                for i, f in entries
            ]
        elif ":queue:" in key:
            snapshot[key] = await redis.zrange(key, 0, -1, withscores=True)
    if tenant is None:
        snapshot[hv.APPLIED_KEY] = await redis.hgetall(hv.APPLIED_KEY)
    return snapshot


def of_tenant(key: str, tenant: str) -> bool:
    """Whether a hot-view key belongs to the tenant (conversation keys and the tenant's own)."""
    return key.startswith((f"sb:{{{tenant}:", f"sb:{{{tenant}}}:"))


def _same_live_tail(live: list[Any], rebuilt: list[Any]) -> bool:
    """Live streams are trimmed with an approximate MAXLEN, which drops whole nodes of entries at
    moments that depend on how the writes were batched: two folds of the same events may keep
    different numbers of old entries. They agree when the shorter is the tail of the longer."""
    n = min(len(live), len(rebuilt))
    return n > 0 and live[-n:] == rebuilt[-n:]


def _first_difference(live: Any, rebuilt: Any) -> str:
    if isinstance(live, list) and isinstance(rebuilt, list):
        for i, (a, b) in enumerate(zip(live, rebuilt, strict=False)):
            if a != b:
                return f"entry {i} of {len(live)} live / {len(rebuilt)} rebuilt: {a!r:.300} != {b!r:.300}"
        return f"{len(live)} entries live, {len(rebuilt)} rebuilt"
    if isinstance(live, dict) and isinstance(rebuilt, dict):
        keys = sorted(k for k in set(live) | set(rebuilt) if live.get(k) != rebuilt.get(k))
        return "; ".join(f"{k}: {live.get(k)!r:.120} != {rebuilt.get(k)!r:.120}" for k in keys[:5])
    return f"{live!r:.200} != {rebuilt!r:.200}"


def snapshot_differences(live: dict[str, Any], rebuilt: dict[str, Any], limit: int = 20) -> list[str]:
    out: list[str] = []
    for key in sorted(set(live) | set(rebuilt)):
        if key == hv.APPLIED_KEY:
            continue
        if key not in rebuilt:
            out.append(f"{key}: only in the live hot view")
        elif key not in live:
            out.append(f"{key}: only in the rebuilt hot view")
        elif key.endswith(":live") and _same_live_tail(live[key], rebuilt[key]):
            pass
        elif live[key] != rebuilt[key]:
            out.append(f"{key}: differs ({_first_difference(live[key], rebuilt[key])})")
        if len(out) >= limit:
            out.append("…")
            break
    return out
