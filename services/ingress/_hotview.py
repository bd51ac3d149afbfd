"""The ingress's side of the Redis hot view: conversation registry, idempotency keys, reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from schemas import hotview as hv
from services.ingress._producer import Ack, Unavailable, unavailable

# Readiness and claims in one step: while the hot view is incomplete (HLEN of READY_KEY below the
# partition count, as after Redis lost data) nothing is claimed, so no write can miss the claim
# of an earlier attempt that a rebuild has not restored yet. SET NX GET returns what was there.
_CLAIM_IF_READY = """
local need = tonumber(ARGV[1])
if need > 0 and redis.call('HLEN', KEYS[1]) < need then
  return -1
end
local previous = {}
for i = 2, #KEYS do
  previous[i - 1] = redis.call('SET', KEYS[i], ARGV[2], 'NX', 'GET', 'EX', ARGV[3])
end
return previous
"""


def rebuilding() -> Unavailable:
    return unavailable(
        "the hot view is being rebuilt after Redis lost data (idempotency claims come back from the log "
        "first); writes are refused until it is complete — retry after the retry-after-ms trailer"
    )


# How long a claim on a client_message_id may stay unresolved (the produce timeout plus margin)
# before a retry may write again.
CLAIM_TTL_S = 120
# A blocking live read waits this long for new entries, then loops. Its connection's socket
# timeout must exceed it, or an idle StreamConversation fails with TimeoutError on its own wait.
LIVE_BLOCK_MS = 5_000
LIVE_SOCKET_TIMEOUT_S = LIVE_BLOCK_MS / 1000 + 10


def live_pool(redis_url: str, max_connections: int) -> aioredis.Redis:
    """The pool for blocking live reads, apart from the write path's so watchers cannot starve it."""
    return aioredis.Redis.from_url(
        redis_url, max_connections=max_connections, socket_timeout=LIVE_SOCKET_TIMEOUT_S
    )


@dataclass(frozen=True, slots=True)
class Registration:
    created_ns: int
    closed_ns: int
    channel: int
    customer_id: str
    state_json: bytes | None
    cursor: str


@dataclass(frozen=True, slots=True)
class Claim:
    """Outcome of claiming a client_message_id: first writer, earlier ack, or a write still in flight."""

    claimed: bool
    earlier: Ack | None = None

    @property
    def in_flight(self) -> bool:
        return not self.claimed and self.earlier is None


def _parse_ack(raw: bytes) -> Ack | None:
    decoded = hv.decode_claim(raw)
    return Ack(*decoded) if decoded is not None else None


class IngressHotView:
    def __init__(
        self, redis: aioredis.Redis, idempotency_ttl_s: int, live_redis: aioredis.Redis | None = None
    ) -> None:
        self._redis = redis
        # Blocking stream reads hold a connection each: they get a pool of their own so that
        # many watchers can never starve the write path.
        self._live = live_redis or redis
        self._ttl = idempotency_ttl_s
        self._claim_if_ready = redis.register_script(_CLAIM_IF_READY)

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
        await self._redis.hset(hv.conversation_key(tenant_id, conversation_id), hv.F_CLOSED_NS, closed_ns)

    async def clear_closed(self, tenant_id: str, conversation_id: str) -> None:
        await self._redis.hdel(hv.conversation_key(tenant_id, conversation_id), hv.F_CLOSED_NS)

    async def is_ready(self, partitions: int) -> bool:
        """Whether the sessions worker has marked every partition's hot view complete."""
        return int(await self._redis.hlen(hv.READY_KEY)) >= partitions

    async def claim_many(self, keys: Sequence[tuple[str, str, str]], partitions: int = 0) -> list[Claim]:
        """Claim each (tenant, conversation, client_message_id) for writing, in one round trip and
        only while the hot view is complete (`partitions` > 0: raises UNAVAILABLE otherwise)."""
        reply: Any = await self._claim_if_ready(
            keys=[hv.READY_KEY, *(hv.idempotency_key(t, c, m) for t, c, m in keys)],
            args=[partitions, hv.CLAIM_PENDING, CLAIM_TTL_S],
        )
        if reply == -1:
            raise rebuilding()
        claims = []
        for previous in reply:
            if previous is None:
                claims.append(Claim(claimed=True))
            else:
                claims.append(Claim(claimed=False, earlier=_parse_ack(previous)))
        return claims

    async def touch_claims(self, keys: Sequence[tuple[str, str, str]]) -> None:
        """Extend claims whose write is still in flight (they expire only if this process dies)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant_id, conversation_id, cmid in keys:
                pipe.expire(hv.idempotency_key(tenant_id, conversation_id, cmid), CLAIM_TTL_S, xx=True)
            await pipe.execute()

    async def settle_many(self, outcomes: Sequence[tuple[tuple[str, str, str], Ack | None]]) -> None:
        """Record acks (a retry then gets the first ack) and drop claims whose write failed."""
        if not outcomes:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for (tenant_id, conversation_id, cmid), ack in outcomes:
                key = hv.idempotency_key(tenant_id, conversation_id, cmid)
                if ack is None:
                    pipe.delete(key)
                else:
                    pipe.set(key, hv.encode_claim(ack.event_id, ack.partition, ack.offset), ex=self._ttl)
            await pipe.execute()

    async def recent_entries(
        self, tenant_id: str, conversation_id: str, count: int
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        entries: Any = await self._redis.xrevrange(
            hv.live_stream_key(tenant_id, conversation_id), count=count
        )
        return list(reversed(entries))

    async def first_retained(self, tenant_id: str, conversation_id: str) -> str | None:
        """The oldest entry id still in the live stream if older entries were trimmed, else None."""
        try:
            info: Any = await self._redis.xinfo_stream(hv.live_stream_key(tenant_id, conversation_id))
        except ResponseError:  # no such stream yet
            return None
        if int(info.get("entries-added", 0)) <= int(info.get("length", 0)) or not info.get("first-entry"):
            return None
        first = info["first-entry"][0]
        return first.decode() if isinstance(first, bytes) else str(first)

    async def read_live(
        self, tenant_id: str, conversation_id: str, after: str, block_ms: int, count: int = 500
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply: Any = await self._live.xread(
            {hv.live_stream_key(tenant_id, conversation_id): after}, block=block_ms, count=count
        )
        if not reply:
            return []
        return list(reply[0][1])
