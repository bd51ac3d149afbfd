"""Failures as gRPC statuses: an outage is UNAVAILABLE (retry), our own bug is INTERNAL with an
incident id that is in the ingress log. Never a stack trace on the wire."""

from __future__ import annotations

import asyncio
import logging
import uuid

import grpc
from redis import exceptions as redis_errors

from services.ingress._producer import RETRY_AFTER_KEY, unavailable
from services.ingress._validation import RequestRejected

log = logging.getLogger(__name__)

# Redis is away, starting, failing over or out of connections: retrying helps. Every other
# RedisError (a ResponseError such as WRONGTYPE or a script error) is a bug of ours.
_REDIS_OUTAGES = (
    redis_errors.ConnectionError,  # also BusyLoadingError, MaxConnectionsError, auth failures
    redis_errors.TimeoutError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.ReadOnlyError,
    redis_errors.MasterDownError,
)
_OUTAGES = (*_REDIS_OUTAGES, ConnectionError, TimeoutError, asyncio.TimeoutError)


def _closed_transport(exc: BaseException) -> bool:
    """uvloop's answer to a write on a connection the peer just closed (a Redis killed under a
    pipeline: seen in the soak, answered INTERNAL): redis-py passes it on as a RuntimeError, not
    as the ConnectionError it is."""
    return isinstance(exc, RuntimeError) and "the handler is closed" in str(exc)


def as_rejection(exc: BaseException, method: str) -> RequestRejected:
    """A failure that is not the caller's fault, as a status."""
    if isinstance(exc, RequestRejected):
        return exc
    if isinstance(exc, redis_errors.TimeoutError):
        # redis-py's repr of it is only "network:TimeoutError": say what happened, and where.
        log.warning("%s: Redis did not answer: %s", method, exc)
        return unavailable("Redis did not answer in time (SWITCHBOARD_REDIS_TIMEOUT_S); retry")
    if (
        isinstance(exc, _OUTAGES)
        or (isinstance(exc, OSError) and not isinstance(exc, redis_errors.RedisError))
        or _closed_transport(exc)
    ):
        log.warning("%s: dependency unavailable: %r", method, exc)
        return unavailable(f"a dependency is unavailable ({type(exc).__name__}); retry")
    incident = uuid.uuid4().hex[:12]
    log.error("%s failed (incident %s)", method, incident, exc_info=exc)
    return RequestRejected(
        grpc.StatusCode.INTERNAL, f"internal error (incident {incident} in the ingress log)"
    )


def retry_metadata(exc: RequestRejected) -> tuple[tuple[str, str], ...]:
    if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return ((RETRY_AFTER_KEY, str(exc.retry_after_ms or 500)),)
    return ()
