"""Failures as gRPC statuses: an outage is UNAVAILABLE (retry), our own bug is INTERNAL with an
incident id that is in the ingress log. Never a stack trace on the wire."""

from __future__ import annotations

import logging
import uuid

import grpc
from redis import exceptions as redis_errors

from services.ingress._producer import RETRY_AFTER_KEY, unavailable
from services.ingress._validation import RequestRejected
from services.outages import is_outage

log = logging.getLogger(__name__)


def as_rejection(exc: BaseException, method: str) -> RequestRejected:
    """A failure that is not the caller's fault, as a status."""
    if isinstance(exc, RequestRejected):
        return exc
    if isinstance(exc, redis_errors.TimeoutError):
        # redis-py's repr of it is only "network:TimeoutError": say what happened, and where.
        log.warning("%s: Redis did not answer: %s", method, exc)
        return unavailable("Redis did not answer in time (SWITCHBOARD_REDIS_TIMEOUT_S); retry")
    if is_outage(exc):
        log.warning("%s: dependency unavailable: %r", method, exc)
        return unavailable(f"{_which(exc)} is unavailable; retry")
    incident = uuid.uuid4().hex[:12]
    log.error("%s failed (incident %s)", method, incident, exc_info=exc)
    return RequestRejected(
        grpc.StatusCode.INTERNAL, f"internal error (incident {incident} in the ingress log)"
    )


def _which(exc: BaseException) -> str:
    """The store an outage is of, in words (its exception class is in the ingress log)."""
    if isinstance(exc, redis_errors.BusyLoadingError):
        return "Redis (loading its data after a restart)"
    if isinstance(exc, redis_errors.RedisError):
        return "Redis"
    if type(exc).__module__.startswith("aiokafka"):
        return "Kafka"
    return "a store this call needs"


def retry_metadata(exc: RequestRejected) -> tuple[tuple[str, str], ...]:
    if exc.retryable and exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return ((RETRY_AFTER_KEY, str(exc.retry_after_ms or 500)),)
    return ()
