"""The metrics interceptor wraps whatever handler the interceptors behind it return.

CI saw a just-issued customer-app key refused as "API key <another key> has roles agent": the
interceptor cached its wrappers by `id(handler)`, and the auth interceptor returns a new handler
per refused call. Once such a handler was freed, its id went to the next handler made (another
key's), and the cached wrapper of the dead one answered that key's calls. The same reuse could
serve a refused call with another key's bound handler (tenant included).
"""

from __future__ import annotations

from typing import Any

import grpc

from services.observability.metrics import MetricsInterceptor


class _Context:
    def code(self) -> None:
        return None


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def test_every_call_runs_the_handler_it_was_given_even_when_ids_are_reused() -> None:
    interceptor = MetricsInterceptor()
    method = "/switchboard.v1.ChatService/StartConversation"
    details = _Details(method)
    for n in range(300):
        # A fresh handler per call, as the auth interceptor's refusals are; freed after the call.
        async def behaviour(request: Any, context: Any, n: int = n) -> int:
            return n

        handler = grpc.unary_unary_rpc_method_handler(behaviour)

        async def continuation(_: Any, handler: Any = handler) -> Any:
            return handler

        wrapped = await interceptor.intercept_service(continuation, details)
        assert await wrapped.unary_unary(None, _Context()) == n
        # Freed at once (no cycles): before the fix the next handler got this one's id and the
        # cached wrapper of this one answered its call (`assert 1 == 2`).
        del handler, continuation, wrapped, behaviour


async def test_the_wrapper_cache_stays_bounded_under_a_flood_of_refusals() -> None:
    interceptor = MetricsInterceptor()
    details = _Details("/switchboard.v1.ChatService/SendMessage")
    kept = []
    for _ in range(20_000):

        async def behaviour(request: Any, context: Any) -> None:
            return None

        handler = grpc.unary_unary_rpc_method_handler(behaviour)
        kept.append(handler)  # alive: every id distinct

        async def continuation(_: Any, handler: Any = handler) -> Any:
            return handler

        await interceptor.intercept_service(continuation, details)
    assert len(interceptor._handlers) <= 4096


async def test_a_streaming_handler_that_writes_through_its_context_is_served() -> None:
    """grpc_health's aio Watch is a coroutine that answers with `context.write()`, not an async
    generator: the interceptor iterated every streaming handler, so each Watch call failed with
    "'async for' requires an object with __aiter__ method, got coroutine" (Check worked)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.aio.server(interceptors=[MetricsInterceptor()])
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await servicer.set("switchboard.v1.ChatService", health_pb2.HealthCheckResponse.SERVING)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="switchboard.v1.ChatService"), timeout=10
            )
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            await servicer.set("switchboard.v1.ChatService", health_pb2.HealthCheckResponse.NOT_SERVING)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
    finally:
        await server.stop(0)
