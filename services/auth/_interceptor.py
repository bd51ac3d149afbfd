"""The server interceptor: who the caller is (its key) and which tenant its requests may name.

The decision needs two things grpc.aio hands over at different times: the metadata (when the
method is looked up: here) and the request messages (later, to the handler). So the handler is
returned wrapped: the wrapper fills an empty `tenant_id` from the key, or refuses another
tenant's, before the service's own validation sees the request.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from services.auth._limits import COSTED, MAX_LEASE, OverLimit, RateLimiter, cost_of
from services.auth._model import (
    OPEN,
    Principal,
    Refusal,
    Registry,
    authorize,
    bearer_token,
    tenant_mismatch,
)

# Wrapped handlers are reused per (method, key); the bound keeps memory flat whatever callers do.
_MAX_CACHED_HANDLERS = 4096


def _tenant_paths(descriptor: Any) -> tuple[bool, tuple[str, ...]]:
    """(has its own tenant_id, names of repeated message fields whose messages have one): where
    a request names tenants. A batch (SendMessageBatchRequest) names one per message."""
    cached = _TENANT_PATHS.get(descriptor.full_name)
    if cached is None:
        own = "tenant_id" in descriptor.fields_by_name
        nested = tuple(
            f.name
            for f in descriptor.fields
            if f.message_type is not None and f.is_repeated and "tenant_id" in f.message_type.fields_by_name
        )
        cached = _TENANT_PATHS[descriptor.full_name] = (own, nested)
    return cached


_TENANT_PATHS: dict[str, tuple[bool, tuple[str, ...]]] = {}


def _fill_tenant(request: Any, principal: Principal) -> Refusal | None:
    """Fill or check every tenant_id the request carries (its own and its batch's messages');
    requests that did not parse go on to be refused by the service."""
    if not isinstance(request, Message):
        return None
    own, nested = _tenant_paths(request.DESCRIPTOR)
    if not own and not nested:
        # Fail closed: a keyed call whose request names no tenant cannot be confined to one.
        return Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{request.DESCRIPTOR.full_name} names no tenant; it cannot be called with a tenant's key",
        )
    targets: list[Any] = [request] if own else []
    for name in nested:
        targets.extend(getattr(request, name))
    for target in targets:
        refusal = tenant_mismatch(principal, target.tenant_id)
        if refusal is not None:
            return refusal
    for target in targets:
        if not target.tenant_id:
            target.tenant_id = principal.tenant_id
    return None


def _refuse_over(context: grpc.aio.ServicerContext, over: OverLimit) -> None:
    """Set the refusal's status on the call; the handler then returns None (grpc.aio sends no
    message with a non-OK code). Not `context.abort`: its exception and traceback cycles, at a
    flood's rate, made the cyclic GC run ~5x as often and lifted every tenant's p99 latency."""
    from services.ingress._producer import RETRY_AFTER_KEY

    context.set_code(over.code)
    context.set_details(over.message)
    if over.retry_after_ms is not None:
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(over.retry_after_ms)),))


@dataclass(frozen=True, slots=True)
class _Gate:
    """The rate limit of one (method, key): the registry is read per call (limits change live)."""

    limiter: RateLimiter
    registry: Callable[[], Registry]
    method: str

    async def unary(self, principal: Principal, request: Any) -> OverLimit | None:
        plan = self.limiter.plan(self.registry(), principal)
        if plan is None or not isinstance(request, Message):
            return None  # unlimited, or a malformed request the service refuses anyway
        need = cost_of(self.method, request, min(limit.burst for limit in plan.limits))
        if need <= 0:
            return None
        granted = await self.limiter.acquire(plan, need, need)
        return granted if isinstance(granted, OverLimit) else None


def _bound(
    handler: grpc.RpcMethodHandler, principal: Principal, gate: _Gate | None = None
) -> grpc.RpcMethodHandler:
    """`handler` with every request checked against the principal's tenant (and rate limits)."""
    deserialize, serialize = handler.request_deserializer, handler.response_serializer
    if not handler.request_streaming and not handler.response_streaming:
        unary = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            refusal = _fill_tenant(request, principal)
            if refusal is not None:
                await context.abort(refusal.code, refusal.message)
            if gate is not None and (over := await gate.unary(principal, request)) is not None:
                _refuse_over(context, over)
                return None
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)

    if not handler.request_streaming:
        streaming = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            refusal = _fill_tenant(request, principal)
            if refusal is not None:
                await context.abort(refusal.code, refusal.message)
            async for response in _responses(streaming(request, context)):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)

    async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        # A foreign tenant ends the request stream with PERMISSION_DENIED: what was read before
        # it is answered, nothing after it is read. (Imported here: the ingress imports this
        # package, and the servicer turns exactly this exception into the call's status.)
        from services.ingress._validation import RequestRejected

        plan = gate.limiter.plan(gate.registry(), principal) if gate is not None else None
        credit, lease = 0, 1
        try:
            async for request in requests:
                refusal = _fill_tenant(request, principal)
                if refusal is not None:
                    raise RequestRejected(refusal.code, refusal.message)
                if plan is not None and gate is not None and isinstance(request, Message):
                    if credit == 0:
                        # Lease tokens ahead in growing chunks: one Redis call per chunk.
                        granted = await gate.limiter.acquire(plan, lease, 1)
                        if isinstance(granted, OverLimit):
                            raise RequestRejected(
                                granted.code, granted.message, retry_after_ms=granted.retry_after_ms
                            )
                        credit, lease = granted, min(MAX_LEASE, lease * 2)
                    credit -= 1
                yield request
        finally:
            if plan is not None and gate is not None and credit > 0:
                await gate.limiter.give_back(plan, credit)

    if not handler.response_streaming:
        stream_unary = handler.stream_unary

        async def stream_in(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await stream_unary(checked(requests), context)

        return grpc.stream_unary_rpc_method_handler(stream_in, deserialize, serialize)

    stream_stream = handler.stream_stream

    async def stream_both(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for response in _responses(stream_stream(checked(requests), context)):
            yield response

    return grpc.stream_stream_rpc_method_handler(stream_both, deserialize, serialize)


async def _responses(produced: Any) -> AsyncIterator[Any]:
    """The responses of a streaming handler; closed with the call (a cancelled caller included)."""
    if isinstance(produced, Awaitable):  # a reader/writer handler writes through the context
        await produced
        return
    async with contextlib.aclosing(produced) as responses:
        async for response in responses:
            yield response


def _refused(handler: grpc.RpcMethodHandler, refusal: Refusal) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers `refusal` without parsing the request."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(refusal.code, refusal.message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(refusal.code, refusal.message)
        yield  # pragma: no cover - makes this an async generator, as grpc.aio expects

    serialize = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, None, serialize)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, None, serialize)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, None, serialize)
    return grpc.unary_unary_rpc_method_handler(unary, None, serialize)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer <key>` against the registry the follower keeps current."""

    def __init__(
        self, registry: Callable[[], Registry], pepper: bytes, limiter: RateLimiter | None = None
    ) -> None:
        self._registry = registry
        self._pepper = pepper
        self._limiter = limiter
        self._handlers: dict[tuple[str, str], grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        token = bearer_token(handler_call_details.invocation_metadata)
        decision = authorize(self._registry(), self._pepper, method, token, time.time())
        if isinstance(decision, Refusal):
            return _refused(handler, decision)
        if decision is OPEN:
            return handler
        cache_key = (method, decision.key_id)
        bound = self._handlers.get(cache_key)
        if bound is None:
            if len(self._handlers) >= _MAX_CACHED_HANDLERS:
                self._handlers.clear()
            gate = (
                _Gate(self._limiter, self._registry, method)
                if self._limiter is not None and method in COSTED
                else None
            )
            bound = self._handlers[cache_key] = _bound(handler, decision, gate)
        return bound
