"""One answer, for every process, to "is this failure an outage of something we depend on?".

An outage (Kafka, Redis or ClickHouse away, starting, failing over, out of connections, slow) is
retried: a processor retries the batch and never dead-letters a record because of it, the ingress
answers UNAVAILABLE with retry-after. Anything else is the record's fault (poison) or a bug of
ours (INTERNAL with an incident id). The ingress and the stream processors used to keep a list
each, and they drifted (a Redis killed under a pipeline was an outage to one and not the other).
"""

from __future__ import annotations

import asyncio
import re

from aiokafka.errors import KafkaConnectionError, KafkaError
from redis import exceptions as redis_errors

# Redis is away, starting, failing over, out of connections or of memory: retrying helps. Every
# other RedisError (a ResponseError such as WRONGTYPE, a script error) is a bug of ours.
_REDIS_OUTAGES: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,  # also BusyLoadingError, MaxConnectionsError, auth failures
    redis_errors.TimeoutError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.ReadOnlyError,
    redis_errors.MasterDownError,
    # maxmemory reached under noeviction: every write is refused until memory is freed. Not the
    # data's fault: dead-lettering would drop good records (review, twenty-first session).
    redis_errors.OutOfMemoryError,
)
# Other refusals of the Redis server's state, not of the data (a plain ResponseError, its code
# first): MISCONF (a failed save with stop-writes-on-bgsave-error), BUSY (a script past
# busy-reply-threshold), NOREPLICAS (min-replicas-to-write). Not BUSYGROUP or BUSYKEY.
_TRANSIENT_REDIS = re.compile(r"(MISCONF|BUSY|NOREPLICAS)\b")
_OUTAGES: tuple[type[BaseException], ...] = (
    *_REDIS_OUTAGES,
    OSError,  # includes ConnectionError and TimeoutError (asyncio.TimeoutError is TimeoutError)
    asyncio.TimeoutError,
    KafkaConnectionError,
)

# ClickHouse errors of the server's state, not of the data (``Code: N.`` in its message): the
# batch is retried, never dead-lettered. Its health probe would still pass during most of them,
# so without this a whole batch of good events went to the dead-letter topic. 159 TIMEOUT_EXCEEDED,
# 202 TOO_MANY_SIMULTANEOUS_QUERIES, 209 SOCKET_TIMEOUT, 210 NETWORK_ERROR, 241
# MEMORY_LIMIT_EXCEEDED, 242 TABLE_IS_READ_ONLY, 252 TOO_MANY_PARTS, 425 SYSTEM_ERROR, 999
# KEEPER_EXCEPTION.
_TRANSIENT_CLICKHOUSE = re.compile(r"\bCode: (159|202|209|210|241|242|252|425|999)\b")


def closed_transport(exc: BaseException) -> bool:
    """uvloop's answer to a write on a connection the peer just closed (a Redis killed under a
    pipeline: seen in the soak, answered INTERNAL): redis-py passes it on as a RuntimeError, not
    as the ConnectionError it is (aiokafka's connections too: services/kafka_clients.py)."""
    return isinstance(exc, RuntimeError) and "the handler is closed" in str(exc)


def is_outage(exc: BaseException) -> bool:
    """A failure of something we depend on: retry it, never blame the data or the caller."""
    if isinstance(exc, _OUTAGES) or closed_transport(exc):
        return True
    if isinstance(exc, redis_errors.ResponseError):
        return _TRANSIENT_REDIS.match(str(exc)) is not None
    if isinstance(exc, KafkaError):
        return bool(getattr(exc, "retriable", False))
    try:
        from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
    except ImportError:  # the ingress may run without the analytics extra
        return False
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DatabaseError) and _TRANSIENT_CLICKHOUSE.search(str(exc)) is not None
