"""Server CPU per unary call: a bare grpc.aio server, the same with two pass-through interceptors
(the ingress runs two: metrics and API keys), and with the wrapping done in a generic handler
instead. The server runs in its own process on uvloop and its CPU time (user + system) is read
around each run, so the client's own cost does not count; the three setups alternate per round.

    .venv/bin/python benchmarks/interceptor_cpu.py [--calls 20000] [--rounds 3] [--port 47100]

Prints µs of server CPU per call (median of the rounds) and the ratio to the bare server.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import psutil

METHOD = "/bench.Echo/Echo"
Handler = Callable[[Any, Any], Awaitable[Any]]


def _echo_handler() -> grpc.RpcMethodHandler:
    async def echo(request: bytes, context: Any) -> bytes:
        return request

    return grpc.unary_unary_rpc_method_handler(echo)


def _wrapped(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    inner: Handler = handler.unary_unary

    async def call(request: bytes, context: Any) -> Any:
        return await inner(request, context)

    return grpc.unary_unary_rpc_method_handler(call)


class _PassThrough(grpc.aio.ServerInterceptor):
    """Like the ingress's interceptors: continuation, then a wrapped handler cached per handler."""

    def __init__(self) -> None:
        self._cache: dict[int, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        wrapped = self._cache.get(id(handler))
        if wrapped is None:
            wrapped = self._cache[id(handler)] = _wrapped(handler)
        return wrapped


class _Generic(grpc.GenericRpcHandler):
    def __init__(self, handler: grpc.RpcMethodHandler, read_metadata: bool) -> None:
        self._handler = handler
        self._read_metadata = read_metadata

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if self._read_metadata:  # as an API-key check would
            for key, _ in details.invocation_metadata or ():
                if key == "authorization":
                    break
        return self._handler if details.method == METHOD else None


def _serve(mode: str, port: int, ready: Any) -> None:
    import uvloop

    uvloop.install()

    async def main() -> None:
        handler = _echo_handler()
        if mode == "two interceptors":
            server = grpc.aio.server(interceptors=[_PassThrough(), _PassThrough()])
            server.add_generic_rpc_handlers((_Generic(handler, False),))
        elif mode == "wrapped in a generic handler":
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((_Generic(_wrapped(_wrapped(handler)), True),))
        else:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((_Generic(handler, False),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def _load(port: int, calls: int, in_flight: int, done: Any) -> None:
    import uvloop

    uvloop.install()

    async def main() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(METHOD)
            for _ in range(200):  # warm-up
                await call(b"x" * 100)
            todo = iter(range(calls))

            async def worker() -> None:
                for _ in todo:
                    await call(b"x" * 100)

            await asyncio.gather(*(worker() for _ in range(in_flight)))

    asyncio.run(main())
    done.set()


MODES = ("bare", "two interceptors", "wrapped in a generic handler")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=50)
    parser.add_argument("--port", type=int, default=47100)
    args = parser.parse_args()
    per_call: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for i, mode in enumerate(MODES):
            ready, done = mp.Event(), mp.Event()
            server = mp.Process(target=_serve, args=(mode, args.port + i, ready))
            server.start()
            ready.wait(30)
            cpu = psutil.Process(server.pid)
            before = sum(cpu.cpu_times()[:2])
            client = mp.Process(target=_load, args=(args.port + i, args.calls, args.in_flight, done))
            client.start()
            done.wait(600)
            client.join()
            used = sum(cpu.cpu_times()[:2]) - before
            server.terminate()
            server.join()
            per_call[mode].append(used / (args.calls + 200) * 1e6)
    bare = statistics.median(per_call["bare"])
    print(
        f"server CPU per unary call, median of {args.rounds} rounds, {args.calls} calls, {args.in_flight} in flight"
    )
    for mode in MODES:
        value = statistics.median(per_call[mode])
        print(
            f"  {mode:30s} {value:7.1f} µs   {value / bare:5.2f}×   rounds {[round(v, 1) for v in per_call[mode]]}"
        )


if __name__ == "__main__":
    main()
